"""lepton.coordinator"""
