"""Test helpers shipped with rewardopt so domain packages reuse them: contract mixins."""
