"""Runner, environments, CLI, sweeps, plots and benchmarks. Importing it
imports `agents` first, which asks JAX for two host devices (`agents.devices`)."""

import agents  # pylint: disable=unused-import
