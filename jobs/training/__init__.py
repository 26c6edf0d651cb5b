"""The training loop inside a rank, split along its seams:

    run.py         build a Trainer from the recipe and run it (`train()`, the rank's entry into training)
    trainer.py     the Trainer: owns its parts, state_dict()/load_state_dict(), the loop
    parts.py       model parts and their optimizers and LR schedulers, as Stateful containers
    state.py       progress (TrainState) and every rank's RNG streams
    schedule.py    building the optimizer and the LR schedule, steps to run
    step.py        one optimizer step: micro-batches, gradient accumulation, precision
    evaluate.py    validation (EvalResult)
    objective.py   the loss and metrics the recipe names (Objective), the built-in accuracy
    agreement.py   how ranks agree on stopping and on when to save
    callbacks.py   hooks the loop calls (e.g. the first_step.json marker)
    context.py     what the launcher says about this run (RunContext)
"""
