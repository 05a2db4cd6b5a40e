"""The lab's ``verl.plugins`` entry point: with ``VERL_PLATFORM=cpu`` it activates the CPU platform in every verl
process (verl loads its plug-ins inside ``import verl``, before anything resolves the platform)."""

from respec_lab.cpu_platform import activate

activate()
