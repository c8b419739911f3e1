from setuptools import find_packages, setup

setup(
    name="rwkvtools",
    version="0.1.0",
    description="Convert, compress and validate RWKV language models (v4, v5, v6, v7)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["rwkvtools", "rwkvtools.*"]) + ["rwkvtools.kernels"],
    # the CUDA sources live in kernels/ at the top of the repository and ship inside the package
    package_dir={"rwkvtools": "rwkvtools", "rwkvtools.kernels": "kernels"},
    package_data={"rwkvtools.kernels": ["*.cu", "*.cpp", "*.h", "*.cuh"], "rwkvtools": ["data/*.txt"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "safetensors>=0.4",
        "numpy>=1.24",
        "click>=8.1",
        "onnx>=1.16",
        "onnxruntime-gpu>=1.18",
        "pyyaml>=6",
        "tqdm>=4.60",
        "tokenizers>=0.15",
        "pyrwkv-tokenizer>=0.9",
        "gguf>=0.19",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=7", "rwkv==0.8.32", "transformers>=4.40"],
        "gpu": ["ninja"],
    },
    entry_points={"console_scripts": ["rwkvtools=rwkvtools.entry:main"]},
)
