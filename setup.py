"""The project's one compiled part: the lexical stage's n-gram counts and its heads' scores
(consumer/classify/cascade/_ngrams.c).

Optional: where it does not build (no C compiler), `pip install` goes on and the numpy code in
consumer/classify/cascade/hashing.py makes the same matrix, and numpy the same scores
(consumer/classify/cascade/stage.py), slower. Everything else is in
pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("consumer.classify.cascade._ngrams", ["consumer/classify/cascade/_ngrams.c"], optional=True)
    ]
)
