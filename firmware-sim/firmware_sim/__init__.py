"""Wire-accurate device simulators for Lampyre's tests, demo and benches (not shipped on
gateways). Run ``python -m firmware_sim --help`` for the command line."""
