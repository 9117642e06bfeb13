"""
Command-line configuration in the nanoGPT / llama2.c style, without the exec: a script keeps its
settings as module-level globals and calls

    config = configurator.configure(globals(), sys.argv[1:], positive=("batch_size", "max_iters"))

Each argument is either a config file (a Python file of `key = value` lines, executed in the script's
globals) or `--key=value`, where value is a Python literal (`--lr=3e-4`, `--compile=False`) or a bare
string (`--out_dir=out`). A setting whose default is "auto" also takes True/False. Unknown keys (with the
closest known ones suggested), malformed arguments and values of the wrong type stop the script with a
one-line error; an int is accepted where a float is expected.
"""
import difflib
import os
import sys
from ast import literal_eval


class ConfigError(ValueError):
    pass


def _convert(key, value: str, default):
    if (isinstance(default, bool) or default == "auto") and value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        parsed = literal_eval(value)
    except (SyntaxError, ValueError):
        parsed = value  # a bare string: --out_dir=out
    if default is None:
        return parsed
    if isinstance(default, float) and isinstance(parsed, int) and not isinstance(parsed, bool):
        return float(parsed)
    if isinstance(default, str) and not isinstance(parsed, str):
        return value  # --out_dir=2024 is still a folder name
    if type(parsed) is not type(default):
        raise ConfigError(f"--{key} expects {type(default).__name__} (e.g. --{key}={default!r}), "
                          f"got {value!r}")
    return parsed


def apply(config: dict, argv, keys=None):
    """Apply config files and --key=value overrides from argv to the dict config (a script's
    globals()). keys: the names that may be set (default: the existing keys of config). Returns the set of
    keys that --key=value arguments set (config files are trusted to know what they set)."""
    keys = set(config if keys is None else keys)
    overridden = set()
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg} not found (arguments are config files or --key=value)")
            print(f"Overriding config with {arg}:", file=sys.stderr)
            with open(arg) as f:
                print(f.read(), file=sys.stderr)
            with open(arg) as f:
                exec(f.read(), config)
            continue
        if "=" not in arg:
            raise ConfigError(f"malformed argument {arg!r}: write --key=value")
        key, value = arg[2:].split("=", 1)
        if key not in keys:
            close = difflib.get_close_matches(key, sorted(keys), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join('--' + k for k in close)}?" if close else \
                " (the settings are the globals at the top of the script)"
            raise ConfigError(f"unknown config key --{key}{hint}")
        config[key] = _convert(key, value, config[key])
        overridden.add(key)
        print(f"Overriding: {key} = {config[key]!r}", file=sys.stderr)
    return overridden


def apply_or_exit(config: dict, argv, keys=None):
    """apply(), but a bad argument ends the program with a one-line error and exit code 2."""
    try:
        return apply(config, argv, keys)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


def settings(config: dict):
    """The settings of a script's globals: the public ints, floats, strings and bools (what its checkpoints and
    metrics record as its config)."""
    return {k: v for k, v in config.items() if not k.startswith("_") and isinstance(v, (int, float, str, bool))}


def configure(config: dict, argv, positive=(), keys=None):
    """apply_or_exit(), then each setting named in positive must be > 0 (an int >= 1), else a one-line error and
    exit code 2. Returns settings(config), the dict a script saves with its checkpoints."""
    apply_or_exit(config, argv, keys)
    for key in positive:
        value = config[key]
        if value <= 0:
            need = ">= 1" if isinstance(value, int) else "> 0"
            print(f"error: --{key} must be {need}, got {value}", file=sys.stderr)
            raise SystemExit(2)
    return settings(config)
