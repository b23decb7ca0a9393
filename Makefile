# The two front-door commands (see README.md). Both set up everything first.
.PHONY: setup demo test test-all

setup:
	bash scripts/setup.sh

# Calibrate, compare FP32/FP16/INT8, export Q/DQ ONNX, then open the dashboard.
demo: setup
	.venv/bin/quantlab demo

# The CI suite (.ci/run calls this).
test: setup
	.venv/bin/python -m pytest -q -m "not slow" -p no:cacheprovider

# Everything, including the slow pretrained-transformer runs.
test-all: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider
