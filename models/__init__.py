"""lepton.models"""
