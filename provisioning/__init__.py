"""Fleet provisioning: CA and identities, broker config and ACL, device bundles.

Library first (``lepton.provisioning.fleet.Fleet``); ``lepton provision ...``
(provisioning/cli.py) is a thin layer over it. See docs/deploy.md.
"""
