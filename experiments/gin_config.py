"""Loading gin files and bindings the way every moerl command does.

`--gin_files` accepts a path, or the name of a config shipped in the `configs`
package (`dqn_softmoe.gin`). Importing this module registers every
configurable (networks, agents, environments, runner) so that an unknown name
in a file or binding is reported instead of silently ignored.
"""

import importlib.resources
import logging
import os
import re
import tokenize
from typing import List, Optional, Sequence

import gin

# Imported for their gin registrations.
import agents.dqn_agent  # noqa: F401  pylint: disable=unused-import
import agents.rainbow_agent  # noqa: F401  pylint: disable=unused-import
import experiments.runner  # noqa: F401  pylint: disable=unused-import
import networks.penultimate  # noqa: F401  pylint: disable=unused-import
import networks.q_network  # noqa: F401  pylint: disable=unused-import
import networks.tokenizers  # noqa: F401  pylint: disable=unused-import


class GinConfigError(ValueError):
  """A gin file or binding is missing or invalid."""


def packaged_config_dir() -> str:
  return str(importlib.resources.files('configs'))


def shipped_configs() -> List[str]:
  return sorted(f for f in os.listdir(packaged_config_dir())
                if f.endswith('.gin'))


def resolve_gin_file(name: str, search_dir: Optional[str] = None) -> str:
  """Returns the path of gin file `name`; GinConfigError if it is nowhere.

  Looks, in order, at: `name` as given (`~` expanded; absolute, or relative
  to the current directory); `search_dir/name` when `search_dir` is given
  (`moerl sweep` passes the spec file's folder; `moerl train` passes none);
  the shipped config `configs/name`. Returns the first file found, as joined
  (not made absolute).
  """
  name = os.path.expanduser(name)
  folders = ['', *([search_dir] if search_dir else []), packaged_config_dir()]
  candidates = list(dict.fromkeys(os.path.join(d, name) for d in folders))
  for path in candidates:
    if os.path.isfile(path):
      return path
  looked = ', '.join(os.path.dirname(os.path.abspath(c)) for c in candidates)
  raise GinConfigError(
      f"gin file '{name}' not found (looked in {looked}): pass a path, or one "
      f"of the shipped configs ({', '.join(shipped_configs())}).")


def first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


# gin's parser hands a value that is not a literal to ast.literal_eval, whose
# error names an AST node: say what gin accepts instead.
_NOT_A_LITERAL = ('a value must be a literal (a number, string, list, tuple, dict, '
                  'True, False or None), an @reference or a %MACRO, not a Python '
                  "expression such as float('nan')")


def _parse_error(error: Exception, paths: Sequence[str] = ()) -> str:
  """One line for an error gin raised while parsing `paths` and bindings."""
  if isinstance(error, UnicodeDecodeError):
    bad = [p for p in paths if not _is_utf8(p)]
    where = f'{bad[0]} is' if bad else 'an included gin file is'
    return f'{where} not UTF-8 text; pass a gin file'
  line = first_line(error)
  if line.startswith('malformed node or string'):
    return _NOT_A_LITERAL
  return line


def _is_utf8(path: str) -> bool:
  try:
    with open(path, encoding='utf-8') as f:
      f.read()
  except UnicodeDecodeError:
    return False
  except OSError:
    pass
  return True


def load(gin_files: Sequence[str], gin_bindings: Sequence[str]) -> None:
  """Clears gin and parses files then bindings; GinConfigError on bad input."""
  paths = [resolve_gin_file(f) for f in gin_files]
  gin.clear_config()
  # `include 'dqn.gin'` inside a shipped config resolves to the packaged copy.
  if packaged_config_dir() not in gin.config._LOCATION_PREFIXES:  # pylint: disable=protected-access
    gin.add_config_file_search_path(packaged_config_dir())
  # gin logs an error for every search-path prefix an include misses.
  logging.disable(logging.ERROR)
  try:
    gin.parse_config_files_and_bindings(paths, list(gin_bindings),
                                        finalize_config=False)
  except tokenize.TokenError as e:  # gin reads to the end of the text
    raise GinConfigError(f'bad gin config: {e.args[0]} (an unclosed bracket '
                         'or quote?)') from None
  except RecursionError as e:  # gin adds an 'In file' line per include level
    # Outermost first, each file once (an include may name a file by a
    # relative path that the command line named by an absolute one).
    files = {}
    for f in reversed(re.findall(r'In file "([^"]+)"', str(e))):
      files.setdefault(os.path.basename(f), f)
    files = list(files.values())
    raise GinConfigError('bad gin config: the includes of '
                         f'{", ".join(files) or "the gin files"} form a loop; remove '
                         'the include that leads back') from None
  except (ValueError, KeyError, TypeError, SyntaxError, OSError, ImportError) as e:
    raise GinConfigError(f'bad gin config: {_parse_error(e, paths)}') from None
  finally:
    logging.disable(logging.NOTSET)


def validate_binding(binding: str) -> None:
  """Raises ValueError if a single binding names an unknown parameter or its
  value is not one gin can parse.

  Parses the binding into an empty gin config and clears it again.
  """
  gin.clear_config()
  try:
    gin.parse_config(binding)
  except (ValueError, KeyError, SyntaxError, ImportError) as e:
    raise ValueError(_parse_error(e)) from None
  finally:
    gin.clear_config()


def _scope_applies(binding_scope: str, call_scope: str) -> bool:
  """Whether a binding under `binding_scope` reaches a call made in
  `call_scope`: its scope names appear there in order (gin applies an
  unscoped binding in every scope)."""
  names = iter(call_scope.split('/'))
  return all(any(n == m for m in names)
             for n in binding_scope.split('/') if n)


def unused_bindings(gin_bindings: Sequence[str],
                    set_by_caller: Sequence[str] = ()) -> List[str]:
  """The bindings, of `gin_bindings`, whose parameter no configurable has used.

  Call it after the config is built (every moerl configurable is called while
  the Runner is built). `set_by_caller` names parameters ('Runner.num_envs')
  that the command passed itself: a binding of one is not reported. Macros,
  imports and includes are not checked.
  """
  operative = gin.config._OPERATIVE_CONFIG  # pylint: disable=protected-access
  skip = {gin.config.ParsedBindingKey.parse(k)[2:] for k in set_by_caller}
  unused = []
  for binding in gin_bindings:
    key = binding.split('=', 1)[0].strip()
    if '=' not in binding or '.' not in key:
      continue
    try:
      parsed = gin.config.ParsedBindingKey.parse(key)
    except (ValueError, KeyError, SyntaxError):
      continue
    if (parsed.complete_selector, parsed.arg_name) in skip:
      continue
    if not any(selector == parsed.complete_selector
               and parsed.arg_name in values
               and _scope_applies(parsed.scope, scope)
               for (scope, selector), values in operative.items()):
      unused.append(binding)
  return unused
