"""clae-tf entry point.

    python run.py --method=simclr --adversarial            # small offline run (scikit-learn digits)
    python run.py --flagfile=flags/cifar10_clae.cfg         # the paper's CIFAR-10 SimCLR+CLAE run
    python run.py --mode=eval --workdir=runs/...            # evaluate a finished run again
"""

import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ start-up chatter out of the log

from clae_tf.runtime import signals  # noqa: E402

# First of all: from here on Ctrl-C and SIGTERM are requests to stop (signals.py), whatever
# disposition this process inherited, and never an exception inside an import.
signals.install()

from absl import app, flags, logging  # noqa: E402
from absl.flags import _helpers  # noqa: E402  (absl's suggestions for a misspelt flag)

from clae_tf import ClaeError  # noqa: E402
from clae_tf.runtime import config, quiet_start, workdir  # noqa: E402

config.define_flags()
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # TF's SavedModel writer logs every step at INFO
    cfg = None
    try:
        signals.check()  # a request while the flags were read
        cfg = config.from_flags()
        if cfg.mode != "train":
            cfg = _with_saved_flags(cfg)
        signals.set_exit_note(_where(cfg))
        quiet_start.start_tensorflow()  # TensorFlow: after the cheap checks (no-GPU noise off)
        from clae_tf.job import app as clae_app
        clae_app.print_summary(clae_app.run(cfg))
    except ClaeError as e:
        signals.stopping()  # a Ctrl-C now must not cut the message short
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # outside the train loop (which saves and says so itself)
        signals.stopping()
        print(f"error: {signals.describe(e)}{_where(cfg) if cfg else ''}", file=sys.stderr)
        sys.exit(2)


def _where(cfg) -> str:
    """What the line of a stop outside the train loop says after "error: <why>"."""
    return (f"; checkpoints so far are kept in {cfg.run_dir}/{workdir.CHECKPOINTS} (the same "
            f"command resumes; --mode=eval --workdir={cfg.run_dir} re-evaluates)")


def _with_saved_flags(cfg):
    """eval/export: the run's own flags.cfg first, then whatever the command line says."""
    path = workdir.flagfile(cfg.run_dir)
    if not os.path.exists(path):
        raise ClaeError(f"--workdir: {cfg.run_dir} has no {workdir.FLAGFILE}; is it a clae-tf "
                        f"run?")
    argv = [sys.argv[0], f"--flagfile={path}"] + sys.argv[1:]
    FLAGS.unparse_flags()
    try:
        FLAGS(argv)
    except (flags.Error, UnicodeDecodeError) as e:  # e.g. cut short by a kill, or not text
        FLAGS.mark_as_parsed()  # absl's own exit handling reads a flag
        # Not `--flagfile=<this file>`: that command reads the same broken file.
        raise ClaeError(f"--workdir: cannot read {path} ({str(e).splitlines()[0][:160]}); "
                        f"re-run the training command on this workdir with its flags on the "
                        f"command line (not --flagfile={path}): once the checkpoint accepts "
                        f"them, it rewrites {os.path.basename(path)}")
    return config.from_flags()


def _parse_flags(argv):
    """absl's parsing, with its errors (unknown value of an enum flag, a non-number, an unknown
    flag) as one `error:` line and exit code 2 like every other bad value."""
    try:
        return FLAGS(argv)
    except UnicodeDecodeError as e:  # absl reads a --flagfile as UTF-8 text
        print(f"error: --flagfile: a flagfile of this command is not UTF-8 text ({e})",
              file=sys.stderr)
        sys.exit(2)
    except flags.UnrecognizedFlagError as e:
        print(f"error: {_unknown_flags(argv, e)}", file=sys.stderr)
        sys.exit(2)
    except flags.Error as e:
        text = str(e).splitlines()[0]
        bad = re.match(r"flag --(\w+)=(.*?): (.*)", text)
        print(f"error: --{bad[1]}: {bad[3]}, got {bad[2]!r}" if bad else f"error: {text}",
              file=sys.stderr)
        sys.exit(2)


def _unknown_flags(argv, first):
    """Every unknown flag of `argv` (absl's error names the first one only), by where it is
    written (each flagfile, nested ones too, or the command line), with absl's suggestion."""
    FLAGS.unparse_flags()
    try:
        rest = FLAGS(argv, known_only=True)[1:]  # the unknown flags and the positional arguments
    except (flags.Error, ValueError):  # a bad value besides: the unknown flag absl names
        rest = [first.flagvalue]
    finally:
        FLAGS.mark_as_parsed()  # absl's own exit handling reads a flag
    files = _flagfiles(argv[1:])
    places = {}  # where -> the unknown flags written there, in order
    for arg in rest:
        if arg == "--":
            break
        name = arg.lstrip("-").split("=", 1)[0]
        if not arg.startswith("-") or not name:
            continue  # a positional argument
        where = [f"in --flagfile={path}" for path, lines in files.items() if arg in lines]
        where += ["on the command line"] if arg in argv[1:] or not where else []
        # absl's suggestions (its own error lists every flag equally close), at most 3.
        close = ["--" + s for s in _helpers.get_flag_suggestions(name, list(FLAGS))]
        close = close[:3] + ["..."] * (len(close) > 3)
        named = f"--{name}" + (f" (did you mean {', '.join(close)}?)" if close else "")
        for place in where:
            places.setdefault(place, [])
            if named not in places[place]:
                places[place].append(named)
    count = sum(len(names) for names in places.values())
    return f"unknown flag{'s' if count > 1 else ''} " + "; ".join(
        f"{place}: {', '.join(names)}" for place, names in places.items())


def _flagfiles(args, found=None):
    """{path: its lines, stripped} of each flagfile that `args` name, and of the flagfiles that
    those name, as absl reads them (paths as written, relative to the working directory)."""
    found = {} if found is None else found
    for i, arg in enumerate(args):
        if arg in ("--flagfile", "-flagfile"):
            path = args[i + 1] if i + 1 < len(args) else ""
        elif arg.startswith(("--flagfile=", "-flagfile=")):
            path = arg.split("=", 1)[1].strip()
        else:
            continue
        path = os.path.expanduser(path)
        if not path or path in found:
            continue
        try:
            with open(path) as f:
                found[path] = [line.strip() for line in f]
        except (OSError, UnicodeDecodeError):
            continue
        _flagfiles(found[path], found)
    return found


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
