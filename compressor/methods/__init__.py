"""Built-in methods, one pure function per file, registered by name (`compressor.registry`); importing this
package registers them. `factor_quant` holds what only methods use (quantising low-rank factors).

May import: the leaves (`errors`, `linalg`, `quant`), `registry`, `nn.factors` (the containers a method returns)
and `budget` (rank maths). Never the pipeline, io or report: a method sees tensors, not modules or files.
"""

from compressor.methods import eora, rtn, svd, svd_llm  # noqa: F401
from compressor.methods import lowrank_sparse  # noqa: F401
from compressor.methods import asvd, gptq  # noqa: F401
from compressor.methods import fwsvd  # noqa: F401
from compressor.methods import auto  # noqa: F401
