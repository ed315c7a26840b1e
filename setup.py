from setuptools import find_packages, setup

setup(
    name="hymoerec",
    version="0.1.0",
    description="Triton kernels for a hybrid mixture-of-experts FFN, and the HyMoERec "
                "sequential recommender built on it",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hymoe_kernels", "hymoe_kernels.*", "hymoerec", "hymoerec.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "filelock",      # the run folder's lock (hymoerec.run_folder)
        "numpy",
        "pyarrow>=14",   # the columnar readers (hymoerec.readers)
        "tqdm",
        "triton>=3.2; platform_system == 'Linux'",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "hypothesis"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["hymoerec-train=hymoerec.train:main",
                                      "hymoerec-evaluate=hymoerec.evaluate:main"]},
)
