"""lepton.agent"""
