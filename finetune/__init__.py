"""finetune: transfer learning from a YAML recipe — a pretrained backbone, a task head, an Accelerate trainer.

The Python API (finetune.api): run, validate, evaluate, load and export, with Run and FinetuneError. Importing the
package is cheap (the libraries load when a function first needs them) and changes nothing in the process.
"""

from finetune.api import Run, evaluate, export, load, run, validate
from finetune.errors import FinetuneError

__version__ = "0.1.0"
__all__ = ["FinetuneError", "Run", "evaluate", "export", "load", "run", "validate"]
