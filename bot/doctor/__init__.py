"""`threadbot doctor`: checks a deployment from outside, one line per check.

Each check is an async generator of `Finding`s over the settings (`runner.default_checks`);
platform checks live with their adapters (`adapters/slack_checks.py`,
`adapters/discord_checks.py`), as all platform code does.
"""
