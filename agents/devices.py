"""Host devices: one for learning, one for acting, on CPU-only machines.

XLA:CPU runs the computations of one device in order: an action selected
while a gradient step runs waits for that step. moerl therefore asks JAX for
`HOST_DEVICES` CPU devices when `agents` is imported, so that a `DQNAgent`
(pipelined updates, async acting) can select actions on a second device
while the first runs the update, and `SeedGroup` can spread seeds over both.
Computations still default to the first device, so nothing else changes.

The request is skipped, leaving JAX as it is, when the user already chose a
count (`XLA_FLAGS=--xla_force_host_platform_device_count=N` or the
`jax_num_cpu_devices` option) or when JAX has already started its backends
(a program that ran JAX code before importing moerl).
"""

import os

import jax

HOST_DEVICES = 2


def request_host_devices(count: int = HOST_DEVICES) -> bool:
  """Asks JAX for `count` CPU devices; True when the request took effect."""
  if 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    return False
  if jax.config.jax_num_cpu_devices != -1:
    return False
  try:
    jax.config.update('jax_num_cpu_devices', count)
  except RuntimeError:  # backends already initialised: keep their devices
    return False
  return True


def learner_device() -> jax.Device:
  return jax.devices()[0]


def acting_device() -> jax.Device:
  """A CPU device other than the learner's, else the learner's own.

  With an accelerator (the learner's device), async acting runs on a host
  CPU device: the accelerator, like XLA:CPU, runs one computation at a time,
  so acting there would wait for the update. The acting params are then
  copied to the host after each learner call.
  """
  learner = learner_device()
  others = [d for d in jax.devices('cpu') if d != learner]
  return others[-1] if others else learner


def host_devices() -> list:
  """The devices seeds can be spread over: all CPU devices on a CPU-only
  machine, the default device otherwise."""
  if learner_device().platform != 'cpu':
    return [learner_device()]
  return list(jax.devices('cpu'))
