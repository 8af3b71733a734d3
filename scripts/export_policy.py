#!/usr/bin/env python
"""Export a model directory's policy: ``python scripts/export_policy.py model=<run>/model format=onnx``.

Writes ``<model>/export/{policy.onnx | policy.pt2, export.json}`` with the carry as explicit inputs and
outputs (``format=onnx,torch_export`` for both) and checks the result against PyTorch. Policies that
cannot be exported (error regression, planners that search) say so and exit with status 2.
"""

from latentrl.control.cli import export_main

if __name__ == "__main__":
    export_main()
