# Schemathesis hooks for scripts/schemathesis.sh (loaded through SCHEMATHESIS_HOOKS).
#
# `spawner dev` runs a backend's `command` as a process on this machine, and schemathesis
# generates commands at random. Each generated command is made to start `true` (the rest of
# it stays as arguments, which `true` ignores), so a run starts nothing but processes that
# exit at once: the api sees exactly the request schemathesis built, apart from the program.
import schemathesis

try:
    from hypothesis.internal import lambda_sources
except ImportError:  # a hypothesis without it has no such description to guard
    lambda_sources = None

# CPython before 3.11.8/3.12.2 can raise "SystemError: AST constructor recursion depth mismatch"
# from ast.parse deep in a stack (python/cpython#106905). Hypothesis parses a lambda's source
# only to describe a strategy in a message, and schemathesis then reports a flaky "runtime
# error". The description is cosmetic: on that error, describe the lambda as unknown.
if lambda_sources is not None and hasattr(lambda_sources, "_lambda_description"):
    _describe_lambda = lambda_sources._lambda_description

    def _lambda_description(f):
        try:
            return _describe_lambda(f)
        except SystemError:
            return "lambda: <unknown>"

    lambda_sources._lambda_description = _lambda_description

SAFE_PROGRAM = "true"


@schemathesis.hook
def map_body(context, body):
    operation = context.operation
    if operation is None or operation.path not in ("/spawn", "/connect"):
        return body
    command = body.get("command") if isinstance(body, dict) else None
    if isinstance(command, list) and command and all(isinstance(c, str) for c in command):
        body = dict(body)
        body["command"] = [SAFE_PROGRAM] + command
    return body
