"""Public home of lrc's compressed modules: `compressor.modules.LowRankLinear` and friends, as documented in the
README and docs. The classes live in `compressor.nn`; this module re-exports them unchanged."""

from compressor.nn.modules import *  # noqa: F401,F403
from compressor.nn.modules import __all__  # noqa: F401
