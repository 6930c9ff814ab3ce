"""
Command-line and config-file overrides for a script's options, nanoGPT style, and `die`, the one-line error every
script reports bad input with. A script keeps its options as plain globals at the top and then runs

    from configurator import configure, die
    configure(globals())        # or nanoGPT's own form: exec(open('configurator.py').read())

so that `python train.py config/stage1.py --batch_size=8 --lr 3e-4` works. A config file is Python whose
plain assignments override the globals of the same name. A `--key=value` (or `--key value`) argument is
parsed with ast.literal_eval and must have the default's type: an int is fine for a float, a None default
takes anything, a str default takes the raw text. An unknown key or a bad value is one line on stderr and
exit status 2, never a traceback. Overrides are reported on stderr, so a script's stdout stays its own.
"""


def die(msg):
    """One line on stderr and exit status 2: how every script reports bad input, never a traceback."""
    import sys
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def configure(g):
    """Override the option globals g of a script from sys.argv: config files and --key=value arguments."""
    import builtins, difflib, sys, types
    from ast import literal_eval
    keys = [k for k, v in g.items() if not k.startswith('_')
            and isinstance(v, (bool, int, float, str, tuple, list, dict, type(None)))]

    def override(key, val, raw=None):  # raw: the command-line text, None for a config-file value
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
            die(f"unknown config key '{key}'" + (f"; closest: {', '.join(close)}" if close else ""))
        old = g[key]
        if raw is not None:
            try:
                val = raw if isinstance(old, str) else literal_eval(raw)
            except (ValueError, SyntaxError):
                val = raw  # plain text: a None default takes it, the type check rejects it otherwise
        if old is not None and type(val) is not type(old):
            if not (type(old) is float and type(val) is int):
                die(f"{key} expects {type(old).__name__}, got {raw if raw is not None else val!r}")
            val = float(val)
        print(f"overriding: {key} = {val!r}", file=sys.stderr)
        g[key] = val

    args = sys.argv[1:]
    while args:
        arg = args.pop(0)
        if arg.startswith('--'):
            key, eq, raw = arg[2:].partition('=')
            if not eq:
                if not args:
                    die(f"--{key} needs a value")
                raw = args.pop(0)
            override(key, None, raw)
        else:
            try:
                code = builtins.compile(open(arg).read(), arg, 'exec')  # train.py has its own `compile`
                ns = {}
                exec(code, ns)
            except OSError as e:
                die(f"cannot read config file {arg}: {e.strerror}")
            except Exception as e:
                die(f"config file {arg}: {type(e).__name__}: {e}")
            for k, v in ns.items():
                if not k.startswith('_') and not isinstance(v, types.ModuleType):
                    override(k, v)


if __name__ != 'configurator':  # exec'd into a script, nanoGPT's way: configure it and leave nothing else behind
    configure(globals())
    del configure, die
