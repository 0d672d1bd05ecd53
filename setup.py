"""blip2_fast: a performance-first BLIP-2 engine.

The op files in the top-level `kernels/` folder are installed as the sub-package
`blip2_fast.kernels`, never as a top-level `kernels`: that name belongs to a PyPI package that
transformers imports. `blip2_fast/kernels/__init__.py` is the package; a wheel gets the op files
copied beside it, an editable install finds them through that file (see its docstring). The optional native library in
`kernels/csrc` is built with CMake when a compiler is present; without one the install still
succeeds and the torch path serves.
"""
import os
import subprocess
import sys

from setuptools import Distribution, find_packages, setup
from setuptools.command.build_py import build_py


class BinaryDistribution(Distribution):
    """The wheel carries a compiled library: tag it for the platform, not py3-none-any."""

    def has_ext_modules(self):
        return True


class BuildWithNative(build_py):
    """Copy the op files into the wheel's blip2_fast/kernels/ and build the optional native
    library with CMake; never fail the install because of the native library."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            self._copy_op_files()
        self._build_native()

    def _copy_op_files(self):
        here = os.path.dirname(os.path.abspath(__file__))
        target = os.path.join(os.path.abspath(self.build_lib), "blip2_fast", "kernels")
        for sub in ("", "csrc"):
            source = os.path.join(here, "kernels", sub)
            os.makedirs(os.path.join(target, sub), exist_ok=True)
            for name in sorted(os.listdir(source)):
                path = os.path.join(source, name)
                if os.path.isfile(path) and (sub or name.endswith(".py")):
                    self.copy_file(path, os.path.join(target, sub, name))

    def _build_native(self):
        if os.environ.get("BLIP2_FAST_NO_NATIVE"):
            return
        here = os.path.dirname(os.path.abspath(__file__))
        if not os.path.exists(os.path.join(here, "CMakeLists.txt")):
            return
        # an editable install imports kernels/ from the source tree: build the library there
        if getattr(self, "editable_mode", False):
            out_dir = os.path.join(here, "kernels")
        else:
            out_dir = os.path.join(os.path.abspath(self.build_lib), "blip2_fast", "kernels")
        build_dir = os.path.join(here, "build", "native")
        try:
            subprocess.check_call(["cmake", "-S", here, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
                                   f"-DBLIP2_FAST_OUTPUT_DIR={out_dir}", f"-DPython3_EXECUTABLE={sys.executable}"])
            subprocess.check_call(["cmake", "--build", build_dir, "-j", str(os.cpu_count() or 1)])
        except (OSError, subprocess.CalledProcessError) as err:
            print(f"blip2_fast: native library not built ({err}); the torch path will serve", file=sys.stderr)


setup(
    name="blip2_fast",
    version="0.1.0",
    description="A fast BLIP-2 engine: Triton kernels, compact inference and training cores",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # every package under blip2_fast/ (blip2_fast.kernels among them; its op files are copied in)
    packages=find_packages(include=["blip2_fast", "blip2_fast.*"]),
    # the shipped miniature BLIP-2: two model folders of config, weights and tokenizer files
    package_data={"blip2_fast": ["default_model/*/*", "default_model/*/*/*"]},
    install_requires=[
        "torch>=2.3,<3",
        "triton>=3.0; platform_system=='Linux'",
        # the floor is the oldest release CI runs the parity tests on (blip2_fast/versions.py)
        "transformers>=5.1",
        "packaging>=20",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pillow>=9.0",
        "tqdm>=4.60",
        "huggingface_hub>=0.23",
        "pyyaml>=6",
        "tokenizers>=0.15",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout", "import-linter>=2.1", "hypothesis>=6.100"],
        "bench": ["pytest-benchmark>=4", "nvidia-ml-py>=12"],
        "gpu": ["flash-attn>=2.5", "xformers>=0.0.26"],
        "int8": ["bitsandbytes>=0.43"],
    },
    entry_points={"console_scripts": ["blip2-fast=blip2_fast.cli:main"]},
    cmdclass={"build_py": BuildWithNative},
    distclass=BinaryDistribution,
)
