"""Engine-process entry points that inject a fault inside the engine process (the HTTP tests
reach the engine only through the process boundary): pass one as `make_client(entry=...)`."""
from engine.serving import process as engine_process

POISON_TOKEN = 255


def poisoned_forward(*args) -> None:
    """The engine process, its forward pass failing whenever a step holds POISON_TOKEN."""
    from engine.runner import ModelRunner
    real = ModelRunner.launch

    def launch(self, step):
        if POISON_TOKEN in step.input_ids.tolist():
            raise RuntimeError("injected: this request's input breaks the forward pass")
        return real(self, step)
    ModelRunner.launch = launch
    engine_process.main(*args)


STEP_DELAY_S = 0.02


def slow_forward(*args) -> None:
    """The engine process, every step taking at least STEP_DELAY_S: a request's time to first
    token then counts the steps it computes (timing tests)."""
    import time

    from engine.runner import ModelRunner
    real = ModelRunner.launch

    def launch(self, step):
        time.sleep(STEP_DELAY_S)
        return real(self, step)
    ModelRunner.launch = launch
    engine_process.main(*args)
