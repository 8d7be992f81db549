from setuptools import find_packages, setup

setup(
    name="mindscedit",
    version="0.1.0",
    description="Efficient fine-tuning of Stable Diffusion (vanilla, LoRA, SCEdit) with MindSpore",
    packages=find_packages(include=["mindscedit", "mindscedit.*"]),
    package_data={"mindscedit": ["assets/photos16/README.md", "assets/photos16/data/*.parquet",
                                 "assets/cat2/README.md", "assets/cat2/*.jpg"]},
    python_requires=">=3.9",
    install_requires=[
        "mindspore>=2.7.0,<2.11",  # tested: 2.7.0 (CI's smoke set) to 2.10; a later one may move what compat.py imports
        "mindone==0.3.0",
        "transformers==4.46.3",
        "safetensors",
        "numpy<2",
        "pillow",
        "pyyaml",
        "pyarrow<20",  # pyarrow>=20 needs numpy 2, which mindspore/mindone 0.3 do not support
        "tqdm",
        "opencv-python-headless",
    ],
    extras_require={
        "plot": ["matplotlib"],  # loss.png (mindscedit plot-logs, and at the end of training)
        "tensorboard": ["tensorboardX"],  # --report_to tensorboard
        # tensorboard itself only to read the events back in the tests
        "test": ["pytest", "pytest-xdist", "matplotlib", "tensorboardX", "tensorboard"],
    },
    entry_points={"console_scripts": ["mindscedit=mindscedit.cli:main"]},
)
