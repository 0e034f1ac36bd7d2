"""mov-jax: Mixture-of-Experts parameter-efficient instruction tuning of T5 in JAX."""

import pathlib

import setuptools

HERE = pathlib.Path(__file__).parent

setuptools.setup(
    name='mov-jax',
    version='0.1.0.dev0',
    description=('MoV / MoLoRA (mixture of IA3 vectors / of LoRA) instruction '
                 'tuning of T5 encoder-decoders in JAX and Flax.'),
    long_description=(HERE / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    # The seqio tasks live in ./tasks and the gin files in ./gin; both are
    # installed *inside* the mov_jax namespace so that a generic name such as
    # `tasks` can never collide with another distribution in site-packages.
    packages=setuptools.find_packages(include=['mov_jax', 'mov_jax.*']) + [
        'mov_jax.tasks', 'mov_jax.gin_files'],
    package_dir={
        'mov_jax': 'mov_jax',
        'mov_jax.tasks': 'tasks',
        'mov_jax.gin_files': 'gin',
    },
    package_data={
        'mov_jax.gin_files': ['*.gin', '*/*.gin', '*/*/*.gin'],
        'mov_jax.tasks': ['data/**/*'],
        # C++ source of the fused CPU kernels, compiled on first use.
        'mov_jax.kernels': ['*.cc', '*.h'],
    },
    install_requires=[
        'jax>=0.10',
        'flax>=0.12',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12',
        'seqio>=0.0.19',
        'gin-config>=0.5.0',
        'clu>=0.0.12',
        'tensorstore>=0.1.60',
        'sentencepiece>=0.2.0',
        'numpy>=1.26',
        'pyarrow>=14',
        'matplotlib>=3.8',
        'tensorboard>=2.15',
    ],
    extras_require={
        # torch is pinned to the CPU build that test machines carry; it is a
        # reference implementation only (Hugging Face T5), never a runtime need.
        'test': [
            'pytest>=8',
            'pytest-xdist>=3.5',
            'torch==2.13.0',
            'transformers>=4.44',
            'safetensors>=0.4',
        ],
        'hf': ['safetensors>=0.4', 'transformers>=4.44'],
        'gpu': ['jax[cuda12]'],
        'tpu': ['jax[tpu]'],
    },
    entry_points={
        'console_scripts': [
            'mov-demo=mov_jax.demo:main',
            'mov-params=mov_jax.params:main',
            'mov-train=mov_jax.train:main',
            'mov-eval=mov_jax.eval:main',
            'mov-convert=mov_jax.convert:main',
        ],
    },
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
)
