"""Where MindSpore's compile cache starts its scan for source files the graph depends on.

MindSpore begins at the process's entry script, which fails for `python -m mindscedit.cli` and
means nothing for an installed console script; compile_cache.py points the scan here instead.
"""
import mindscedit.cli  # noqa: F401
