"""PyTorch eager execution behind the common runner interface (:mod:`.runner`)."""
