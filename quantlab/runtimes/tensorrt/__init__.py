"""TensorRT: the loader builds strongly typed engines from quantlab's ONNX files
(:mod:`.loader`); the runner executes them (:mod:`.runner`). Neither is exercised on the
machines quantlab is developed on (TensorRT cannot be installed there)."""
