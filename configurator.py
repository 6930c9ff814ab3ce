"""
Command-line and config-file overrides for a script's options, nanoGPT style. A script keeps its options as
plain globals at the top and then runs

    exec(open('configurator.py').read())

so that `python train.py config/stage1.py --batch_size=8 --lr 3e-4` works. A config file is Python whose
plain assignments override the globals of the same name. A `--key=value` (or `--key value`) argument is
parsed with ast.literal_eval and must have the default's type: an int is fine for a float, a None default
takes anything, a str default takes the raw text. An unknown key or a bad value is one line on stderr and
exit status 2, never a traceback. Overrides are reported on stderr, so a script's stdout stays its own.
"""

def _configure(g):
    # everything lives in this function so the caller's globals gain nothing but the overrides
    import builtins, difflib, sys, types
    from ast import literal_eval
    keys = [k for k, v in g.items() if not k.startswith('_')
            and isinstance(v, (bool, int, float, str, tuple, list, dict, type(None)))]

    def fail(msg):
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)

    def override(key, val, raw=None):  # raw: the command-line text, None for a config-file value
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
            fail(f"unknown config key '{key}'" + (f"; closest: {', '.join(close)}" if close else ""))
        old = g[key]
        if raw is not None:
            try:
                val = raw if isinstance(old, str) else literal_eval(raw)
            except (ValueError, SyntaxError):
                val = raw  # plain text: a None default takes it, the type check rejects it otherwise
        if old is not None and type(val) is not type(old):
            if not (type(old) is float and type(val) is int):
                fail(f"{key} expects {type(old).__name__}, got {raw if raw is not None else val!r}")
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
                    fail(f"--{key} needs a value")
                raw = args.pop(0)
            override(key, None, raw)
        else:
            try:
                code = builtins.compile(open(arg).read(), arg, 'exec')  # train.py has its own `compile`
                ns = {}
                exec(code, ns)
            except OSError as e:
                fail(f"cannot read config file {arg}: {e.strerror}")
            except Exception as e:
                fail(f"config file {arg}: {type(e).__name__}: {e}")
            for k, v in ns.items():
                if not k.startswith('_') and not isinstance(v, types.ModuleType):
                    override(k, v)

_configure(globals())
del _configure
