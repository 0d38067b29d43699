"""Command-line tools: ``python -m hiervl.tools.<name>`` (CLIP pretraining, export, ONNX runs)."""
