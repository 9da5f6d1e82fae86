"""The WKV recurrence with a state in, a state out and (through autograd) a gradient to the state.

Only the plain reference exists for now; faster CPU and CUDA backends plug in here and are tested
against it.
"""

from .reference import wkv5, wkv7

__all__ = ["wkv5", "wkv7"]
