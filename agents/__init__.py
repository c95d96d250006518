"""DQN and Rainbow agents, replay buffers (see `agents.devices` for the two
host devices requested on import)."""

from agents import devices as _devices

_devices.request_host_devices()
