"""Install the CPU-environment shims into the running interpreter's site-packages.

Run by ``make`` after the project is installed. On a machine whose torch has CUDA it does
nothing; on CPU it removes the CUDA-only torchaudio/torchcodec wheels vLLM pulled in (vLLM
works without them) and installs a ``.pth`` hook that loads :mod:`torchvision_cpu_shim`.
"""
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

SHIM = "megavrl_torchvision_cpu_shim"


def main() -> int:
    import torch

    site = Path(sysconfig.get_paths()["purelib"])
    if torch.cuda.is_available() or torch.version.cuda is not None:
        print(f"torch {torch.__version__} has CUDA: no CPU shims needed")
        return 0
    shutil.copyfile(Path(__file__).with_name("torchvision_cpu_shim.py"), site / f"{SHIM}.py")
    (site / f"{SHIM}.pth").write_text(f"import {SHIM}\n")
    for pkg in ("torchaudio", "torchcodec"):
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", pkg],
                       check=False, stderr=subprocess.DEVNULL)
    print(f"CPU torch {torch.__version__}: installed {SHIM}.pth, removed torchaudio/torchcodec")
    return 0


if __name__ == "__main__":
    sys.exit(main())
