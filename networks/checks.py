"""The integer test every package's argument checks share.

It lives in `networks`, the package the others import (networks <- agents <-
experiments), and imports only NumPy.
"""

import numpy as np


def is_int(value) -> bool:
  """An integer (Python or NumPy), and not a bool, which Python counts as one."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
