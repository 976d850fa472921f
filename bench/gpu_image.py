"""The lent GPU machine's Python packages, the wheels carried to it in .whl/, and a simulation of that machine here.

The GPU machine (one H100 or H200, no network) has torch, transformers, peft, accelerate, pandas, pyarrow, ...
but no bitsandbytes, hqq, datasets, plotly or gradio: those travel as wheels in .whl/ (`bash bench/gpu_check.sh
--prepare`), which count against the 64 MiB that a call may carry (with the working tree).

    python -m bench.gpu_image check [.whl]        # total size of the wheels; each wheel's needs met on the machine?
    python -m bench.gpu_image simulate DIR [.whl] # DIR/sitecustomize.py hides, in every Python process that has DIR
                                                  # on PYTHONPATH, the packages the machine would lack (neither in
                                                  # its image nor carried): gpu_check.sh --small runs under it

`check` exits 1 when a wheel needs a package that is neither there nor carried, or when the wheels and the
working tree pass the limit. The image's list is the one the device README (KINDS.md) gave on 2026-11-17.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from bench.common import ROOT

#: the distributions of the GPU machine's image ('cuda'), as the device README listed them on 2026-11-17
IMAGE = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp""".split())
#: what one call may carry: the working tree (tracked and untracked-not-ignored files) and the carried paths
LIMIT_BYTES = 64 * 2**20
#: the machine's interpreter, for wheel markers
MACHINE_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
               "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
#: this project's own top-level packages (never hidden)
OWN = {"quailora_app", "bench", "tests", "helpers", "app"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> str:
    return norm(path.name.split("-")[0])


def wheel_requires(path: Path) -> list[str]:
    """The distributions a wheel needs on the machine (Requires-Dist without extras, markers for Python 3.12)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    needs = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None or req.marker.evaluate(MACHINE_ENV):
            needs.append(norm(req.name))
    return needs


def tree_bytes() -> int:
    """The size of what travels besides carried paths: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return sum((ROOT / f).stat().st_size for f in out.split("\0") if f and (ROOT / f).is_file())


def check(folder: Path) -> int:
    wheels = sorted(folder.glob("*.whl"))
    carried = {wheel_name(w) for w in wheels}
    total = sum(w.stat().st_size for w in wheels)
    print(f"{'wheel':<72} {'MiB':>7}")
    for w in sorted(wheels, key=lambda w: -w.stat().st_size):
        print(f"{w.name:<72} {w.stat().st_size / 2**20:7.2f}")
    tree = tree_bytes()
    print(f"{'wheels in all':<72} {total / 2**20:7.2f}")
    print(f"{'working tree (tracked + untracked, not ignored)':<72} {tree / 2**20:7.2f}")
    print(f"{'what one call carries (limit 64 MiB)':<72} {(total + tree) / 2**20:7.2f}")
    missing = {}
    for w in wheels:
        lack = [n for n in wheel_requires(w) if n not in IMAGE and n not in carried]
        if lack:
            missing[w.name] = lack
    for name, lack in missing.items():
        print(f"MISSING on the machine, needed by {name}: {', '.join(lack)}")
    versions = {}
    for w in wheels:
        versions.setdefault(wheel_name(w), []).append(w.name)
    twice = {k: v for k, v in versions.items() if len(v) > 1}
    for name, files in twice.items():
        print(f"TWO VERSIONS of {name} (pip would refuse): {', '.join(files)}")
    over = total + tree > LIMIT_BYTES
    if over:
        print("OVER the 64 MiB a call may carry")
    return 1 if missing or over or twice else 0


def requires_closure(names: set[str]) -> set[str]:
    """`names` and everything they need, as installed here (what the machine's image must hold for them to run)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        from packaging.requirements import Requirement

        for line in reqs:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(MACHINE_ENV):
                todo.append(norm(req.name))
    return seen


def hidden_modules(folder: Path) -> list[str]:
    """Top-level modules installed here whose distributions the machine would lack: in neither the image (with what
    its packages need) nor the carried wheels."""
    there = requires_closure(IMAGE) | {wheel_name(w) for w in folder.glob("*.whl")}
    hidden = []
    for module, dists in metadata.packages_distributions().items():
        if module in OWN or module.startswith("_") and module[1:] in OWN:
            continue
        if not any(norm(d) in there for d in dists) and module.isidentifier():
            hidden.append(module)
    return sorted(hidden)


SITECUSTOMIZE = '''"""Written by bench/gpu_image.py: hide the packages the GPU machine would lack (see that file)."""
import sys
from importlib.machinery import PathFinder

HIDDEN = frozenset({hidden!r})
SEEN = {log!r}


class _MachineFinder(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            try:
                with open(SEEN, "a") as f:
                    f.write(name.partition(".")[0] + "\\n")
            except OSError:
                pass
            return None
        return PathFinder.find_spec(name, path, target)


sys.meta_path[:] = [_MachineFinder if f is PathFinder else f for f in sys.meta_path]
'''


def simulate(target: Path, folder: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    hidden = hidden_modules(folder)
    log = target / "hidden-imports.txt"
    log.write_text("")
    (target / "sitecustomize.py").write_text(SITECUSTOMIZE.format(hidden=hidden, log=str(log)))
    print(f"simulated GPU machine: {len(hidden)} top-level modules hidden (neither in its image nor carried), "
          f"e.g. {', '.join(hidden[:8])}; imports of them are logged to {log}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check")
    c.add_argument("folder", nargs="?", default=str(ROOT / ".whl"))
    s = sub.add_parser("simulate")
    s.add_argument("target")
    s.add_argument("folder", nargs="?", default=str(ROOT / ".whl"))
    args = parser.parse_args(argv)
    if args.command == "check":
        return check(Path(args.folder))
    simulate(Path(args.target), Path(args.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
