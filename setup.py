from setuptools import find_packages, setup

setup(
    name="clae-tf",
    version="0.1.0",
    description="Contrastive Learning with Adversarial Examples (CLAE) in TensorFlow / Keras 3",
    packages=find_packages(include=["clae_tf", "clae_tf.*"]),
    python_requires=">=3.10",
    # Ranges known to install and work together (checked with TF 2.21 / Keras 3.15).
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<3.16",
        "tensorflow-datasets>=4.9.10,<4.10",
        "absl-py>=2.0",
        "tensorboard>=2.21,<2.22",
        "numpy>=1.26",
        "scikit-learn>=1.3",  # ships the offline default dataset (8x8 digits)
    ],
    extras_require={
        # keras-cv 0.9.0 checked with TF 2.21 / Keras 3.15 (it pulls keras-core and kagglehub).
        "keras-cv": ["keras-cv==0.9.0"],
        "test": ["pytest>=7", "pytest-xdist>=3.6.1,<4", "matplotlib>=3.7", "keras-cv==0.9.0",
                 "ruff>=0.17,<0.18"],  # ruff.toml
        "plot": ["matplotlib>=3.7"],
        # bench/robust_speed.py's reference attack library (APGD, Square); never needed by tests.
        "bench": ["adversarial-robustness-toolbox>=1.20,<1.21"],
    },
)
