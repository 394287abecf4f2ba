"""``graphc train`` and ``graphc test``, with ``caffe train`` / ``caffe test`` habits.

    graphc train SOLVER [--weights W.caffemodel[,W2...]] [--snapshot S.solverstate]
                        [--iterations N] [--level L] [--stage S]...
    graphc test --model NET --weights W.caffemodel [--iterations 50]

The log goes to stderr in Caffe's glog format (so Caffe's log parsers work on it), with a
progress bar when stderr is a terminal.  Ctrl-C stops training after the current
iteration and writes a snapshot; SIGHUP writes a snapshot and goes on (Caffe's
``-sigint_effect stop -sighup_effect snapshot``; both can be changed).
"""
from __future__ import annotations

import sys

import numpy as np

from ..errors import GraphcError
from .log import TrainLog, g
from .signals import EFFECTS, SNAPSHOT, STOP, SignalHandler


def add_train_parsers(sub) -> None:
    p = sub.add_parser("train", help="train with a Caffe solver (like caffe train)",
                       description="Train the solver's net; the log (Caffe's format) goes to "
                                   "stderr.")
    p.add_argument("solver", help="the solver .prototxt")
    p.add_argument("--weights", help="weights to fine-tune from (.caffemodel or .h5; several "
                                     "comma-separated); not with --snapshot")
    p.add_argument("--snapshot", help="a .solverstate to resume training from")
    p.add_argument("--iterations", type=int, metavar="N",
                   help="train until iteration N (overrides the solver's max_iter)")
    p.add_argument("--level", type=int, default=0, help="train net state level")
    p.add_argument("--stage", action="append", default=[], help="train net state stage "
                                                                "(repeatable)")
    p.add_argument("--sigint-effect", "--sigint_effect", choices=EFFECTS, default=STOP,
                   help="what Ctrl-C does (default: stop, after a snapshot)")
    p.add_argument("--sighup-effect", "--sighup_effect", choices=EFFECTS, default=SNAPSHOT,
                   help="what SIGHUP does (default: snapshot and go on)")
    p.add_argument("--log", metavar="FILE", help="also append the log to FILE")
    p.add_argument("--backend", choices=("cpu", "reference"), default=None,
                   help="run the training pass compiled by the CPU backend (default when "
                        "it can compile every layer; otherwise the log says why and training "
                        "falls back to the reference executor) or on the numpy reference "
                        "executor")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("test", help="score a trained net on its test data (like caffe test)")
    p.add_argument("--model", required=True, help="the net's .prototxt (with data layers)")
    p.add_argument("--weights", required=True, help="the trained weights")
    p.add_argument("--iterations", type=int, default=50, metavar="N",
                   help="number of batches (default 50)")
    p.add_argument("--phase", choices=("train", "test"), default="test")
    p.add_argument("--level", type=int, default=0)
    p.add_argument("--stage", action="append", default=[])
    p.add_argument("--log", metavar="FILE", help="also append the log to FILE")
    p.set_defaults(func=cmd_test)


def _open_log(args, progress: bool):
    also = open(args.log, "a") if args.log else None
    return TrainLog(sys.stderr, progress=progress, also=also), also


def cmd_train(args) -> int:
    from ..frontend import caffe_pb2 as pb
    from .solver import _load_param, get_solver
    if args.snapshot and args.weights:
        raise GraphcError("both --snapshot and --weights are given",
                          hint="give --snapshot to resume training or --weights to fine-tune, "
                               "not both")
    sp, filename = _load_param(args.solver)
    sp.train_state.level = args.level
    sp.train_state.stage.extend(args.stage)
    if args.iterations is not None:
        if args.iterations < 0:
            raise GraphcError(f"--iterations is {args.iterations}",
                              hint="give the iteration to train until (>= 0)")
        sp.max_iter = args.iterations
    if args.snapshot:
        sp.ClearField("weights")
    elif args.weights:
        sp.ClearField("weights")
        sp.weights.append(args.weights)
    log, also = _open_log(args, progress=not args.no_progress)
    try:
        log.info("Use CPU.", "caffe.cpp:197")
        if sp.solver_mode == pb.SolverParameter.GPU:
            log.info("solver_mode is GPU: graphc trains on the CPU", "caffe.cpp:197")
        with SignalHandler(args.sigint_effect, args.sighup_effect) as signals:
            solver = get_solver(sp, log=log, filename=filename,
                                backend=args.backend or "auto")
            solver.set_action_function(signals.action)
            log.info("Starting Optimization", "caffe.cpp:239")
            if args.snapshot:
                log.info(f"Resuming from {args.snapshot}", "caffe.cpp:241")
                solver.solve(args.snapshot)
            else:
                solver.solve()
        log.info("Optimization Done.", "caffe.cpp:250")
    finally:
        log.end_bar()
        if also is not None:
            also.close()
    return 0


def cmd_test(args) -> int:
    from ..net import Net
    from .solver import _outputs_with_weights, _weighted_loss
    if args.iterations <= 0:
        raise GraphcError(f"--iterations is {args.iterations}", hint="give a number of batches > 0")
    log, also = _open_log(args, progress=False)
    try:
        log.info("Use CPU.", "caffe.cpp:282")
        net = Net(args.model, weights=args.weights, phase=args.phase, level=args.level,
                  stages=args.stage)
        if net.inputs:
            raise GraphcError(f"the net has inputs ({', '.join(net.inputs)}) that `graphc test` "
                              "cannot feed", where=args.model,
                              hint="give the net data layers (Data, HDF5Data, ImageData, ...) "
                                   "for the test phase")
        outputs = sorted(_outputs_with_weights(net.graph), key=lambda t: t[0].encode())
        log.info(f"Running for {args.iterations} iterations.", "caffe.cpp:304")
        scores = None
        loss = np.float32(0)
        for i in range(args.iterations):
            outs = net.forward()
            loss = np.float32(loss + _weighted_loss(net, outs))
            vec = np.concatenate([np.asarray(outs[b], np.float32).ravel() for b, _, _ in outputs]) \
                if outputs else np.zeros(0, np.float32)
            scores = vec.copy() if scores is None else scores + vec
            for blob, v, _ in outputs:
                for x in np.asarray(outs[blob], np.float32).ravel():
                    log.info(f"Batch {i}, {blob} = {g(x)}", "caffe.cpp:326")
        loss = np.float32(loss / np.float32(args.iterations))
        log.info(f"Loss: {g(loss)}", "caffe.cpp:331")
        k = 0
        for blob, v, w in outputs:
            for _ in np.asarray(outs[blob]).ravel():
                mean = np.float32(scores[k] / np.float32(args.iterations))
                extra = f" (* {g(w)} = {g(np.float32(w) * mean)} loss)" if w else ""
                log.info(f"{blob} = {g(mean)}{extra}", "caffe.cpp:343")
                k += 1
    finally:
        if also is not None:
            also.close()
    return 0
