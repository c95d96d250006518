"""The integer test and seed range every package's argument checks share.

It lives in `networks`, the package the others import (networks <- agents <-
experiments), and imports only NumPy.
"""

import numpy as np

MAX_SEED = 2**31 - 1  # seeds reach JAX, NumPy and the envs: int32 suits them all


def is_int(value) -> bool:
  """An integer (Python or NumPy), and not a bool, which Python counts as one."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value) -> bool:
  """A real number (Python or NumPy), and not a bool; NaN included."""
  return (isinstance(value, (int, float, np.integer, np.floating))
          and not isinstance(value, bool))


def check_fractions(owner: str, **values) -> None:
  """ValueError naming `owner.name` unless every value is a number in [0, 1]."""
  for name, value in values.items():
    if not is_number(value) or not 0.0 <= value <= 1.0:
      raise ValueError(f'{owner}.{name}={value!r} must be a number in [0, 1].')


def check_flags(owner: str, **flags) -> None:
  """ValueError naming `owner.name` unless every flag is True or False (a
  string such as 'no' would otherwise count as true)."""
  for name, value in flags.items():
    if not isinstance(value, (bool, np.bool_)):
      raise ValueError(f'{owner}.{name}={value!r} must be True or False.')
