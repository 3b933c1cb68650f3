"""Built-in methods. Importing this package registers them; each file is one pure method."""

from compressor.methods import eora, rtn, svd, svd_llm  # noqa: F401
from compressor.methods import lowrank_sparse  # noqa: F401
from compressor.methods import asvd, gptq  # noqa: F401
from compressor.methods import fwsvd  # noqa: F401
from compressor.methods import auto  # noqa: F401
