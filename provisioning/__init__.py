"""lepton.provisioning"""
