"""Run an ONNX file with ONNX Runtime in a separate Python process that never imports PyTorch.

This is the deployment situation (numpy + onnxruntime only); the child process checks and
reports that ``torch`` is absent from ``sys.modules``. It runs with ``python -I`` so neither the
working directory nor ``PYTHONPATH`` can shadow ``onnx``/``onnxruntime``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from torchslim.export._base import ExportError
from torchslim.graph.inputs import Inputs

__all__ = ["load_onnx_isolated"]

_CHILD = r"""
import json, sys
import numpy as np
import onnxruntime as ort
model, src, dst = sys.argv[1:4]
opts = ort.SessionOptions()
opts.log_severity_level = 3
sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
data = np.load(src)
feed = {i.name: data[f"arg{k}"] for k, i in enumerate(sess.get_inputs())}
outs = sess.run(None, feed)
np.savez(dst, **{f"out{k}": o for k, o in enumerate(outs)})
print(json.dumps({"torch_imported": "torch" in sys.modules, "outputs": len(outs)}))
"""


def load_onnx_isolated(path: Path, device: torch.device | None = None) -> Callable[[Inputs], list[torch.Tensor]]:
    """Like :func:`torchslim.export.onnx.load_onnx`, but each run happens in a torch-free child process.

    Raises (when run):
        ExportError: the child failed, or PyTorch was imported in it after all.
    """

    def run(inputs: Inputs) -> list[torch.Tensor]:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
            np.savez(src, **{f"arg{k}": t.detach().cpu().numpy() for k, t in enumerate(inputs.tensors())})
            env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
            proc = subprocess.run([sys.executable, "-I", "-c", _CHILD, str(path), str(src), str(dst)],
                                  capture_output=True, text=True, timeout=300, env=env, check=False)
            if proc.returncode != 0:
                raise ExportError(f"ONNX Runtime (torch-free process) failed on {path}: {proc.stderr.strip()[-400:]}",
                                  format="onnx", reason="isolated run failed")
            report = json.loads(proc.stdout.strip().splitlines()[-1])
            if report["torch_imported"]:
                raise ExportError("the ONNX Runtime process imported torch; it must run without it",
                                  format="onnx", reason="torch imported")
            with np.load(dst) as out:
                return [torch.from_numpy(out[f"out{k}"].copy()) for k in range(report["outputs"])]

    return run
