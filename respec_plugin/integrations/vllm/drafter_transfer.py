"""The socket a drafter push travels on, shared by its two ends (the actor rank that sends, in verl's worker, and the
vLLM worker that receives): the actor's weight-sync socket with a suffix, so the two transfers never meet."""

WEIGHTS_SOCKET_SUFFIX = ".sock"
DRAFTER_SOCKET_SUFFIX = "-respec-drafter.sock"


def drafter_ipc_handle(weights_ipc_handle: str) -> str:
    """``ipc:///tmp/rl-colocate-zmq-<job>-replica-<r>-rank-<i>.sock`` -> ``...-rank-<i>-respec-drafter.sock``."""
    if not weights_ipc_handle.endswith(WEIGHTS_SOCKET_SUFFIX):
        raise ValueError(f"weight-sync handle {weights_ipc_handle!r} does not end in {WEIGHTS_SOCKET_SUFFIX!r}")
    return weights_ipc_handle[: -len(WEIGHTS_SOCKET_SUFFIX)] + DRAFTER_SOCKET_SUFFIX
