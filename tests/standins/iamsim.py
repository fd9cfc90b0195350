"""IAM's SimulatePrincipalPolicy in front of moto, which does not implement it (it answers HTTP 500).

A WSGI app for AWS_ENDPOINT_URL_IAM: a SimulatePrincipalPolicy call is answered here, every other IAM call is
passed to moto as it came (moto does not check signatures) and moto's answer is returned as it is.

The simulation evaluates the principal's identity policies as moto holds them (a user's inline and attached
policies and those of its groups; a role's inline and attached policies, read from moto's store: its server runs
in this process) with tests.iam_check, which models
IAM's evaluation closely enough for this suite's policies (see its docstring for what it leaves out). The caller
must itself be allowed iam:SimulatePrincipalPolicy on the principal: a call signed with an access key of an IAM
user in moto is checked against that user's policies (AccessDenied, 403, otherwise); any other key is moto's
default caller, which may do anything.

Query protocol (IAM 2010-05-08): `ActionNames.member.N`, `ResourceArns.member.N` (none: `*`),
`ContextEntries.member.N.ContextKeyName` / `.ContextKeyValues.member.M`; the answer lists one EvaluationResult per
action and resource, EvalDecision `allowed` or `implicitDeny` (tests.iam_check does not tell an explicit deny
apart), never truncated.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
import uuid
from urllib.parse import unquote
from xml.sax.saxutils import escape

from werkzeug.wrappers import Request, Response

from tests.iam_check import is_allowed

_NS = "https://iam.amazonaws.com/doc/2010-05-08/"
_HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")


class _Error(Exception):
    def __init__(self, code: str, message: str, status: int):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


class IamSimulator:
    def __init__(self, moto_url: str, account_id: str = "123456789012"):
        self.moto_url = moto_url.rstrip("/")
        self.account_id = account_id
        self.simulated: list[dict] = []  # each SimulatePrincipalPolicy call: principal, actions, resources

    def __call__(self, environ, start_response):
        request = Request(environ)
        request.get_data()  # kept: the form is read from it, and a forwarded call sends it on
        if request.method == "POST" and request.form.get("Action") == "SimulatePrincipalPolicy":
            try:
                response = self._xml("SimulatePrincipalPolicy", self._simulate(request))
            except _Error as err:
                response = Response(
                    f'<ErrorResponse xmlns="{_NS}"><Error><Type>Sender</Type><Code>{err.code}</Code>'
                    f"<Message>{escape(err.message)}</Message></Error><RequestId>{uuid.uuid4()}</RequestId>"
                    "</ErrorResponse>", status=err.status, content_type="text/xml")
        else:
            response = self._forward(request)
        return response(environ, start_response)

    # ------------------------------------------------------------------------------------------- moto

    def _forward(self, request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        query = request.query_string.decode()
        forwarded = urllib.request.Request(self.moto_url + request.path + (f"?{query}" if query else ""),
                                           data=request.get_data() or None, method=request.method, headers=headers)
        try:
            with urllib.request.urlopen(forwarded, timeout=60) as answer:
                status, answer_headers, body = answer.status, answer.headers, answer.read()
        except urllib.error.HTTPError as answer:
            status, answer_headers, body = answer.code, answer.headers, answer.read()
        kept = [(k, v) for k, v in answer_headers.items() if k.lower() not in _HOP_HEADERS]
        return Response(body, status=status, headers=kept)

    # ------------------------------------------------------------------------------------------- simulation

    def _simulate(self, request: Request) -> str:
        form = request.form
        principal = form.get("PolicySourceArn", "")
        actions = _members(form, "ActionNames")
        resources = _members(form, "ResourceArns") or ["*"]
        context = {}
        n = 1
        while f"ContextEntries.member.{n}.ContextKeyName" in form:
            values = _members(form, f"ContextEntries.member.{n}.ContextKeyValues")
            context[form[f"ContextEntries.member.{n}.ContextKeyName"]] = values[0] if values else ""
            n += 1
        caller = self._caller(request)
        if caller is not None and not is_allowed(self._documents(caller), "iam:SimulatePrincipalPolicy", principal):
            raise _Error("AccessDenied", f"User: {caller} is not authorized to perform: iam:SimulatePrincipalPolicy "
                                         f"on resource: {principal}", 403)
        documents = self._documents(principal)
        self.simulated.append({"principal": principal, "actions": actions, "resources": resources})
        results = []
        for action in actions:
            for resource in resources:
                decision = "allowed" if is_allowed(documents, action, resource, context) else "implicitDeny"
                results.append(f"<member><EvalActionName>{escape(action)}</EvalActionName>"
                               f"<EvalResourceName>{escape(resource)}</EvalResourceName>"
                               f"<EvalDecision>{decision}</EvalDecision><MatchedStatements/>"
                               "<MissingContextValues/></member>")
        return f"<EvaluationResults>{''.join(results)}</EvaluationResults><IsTruncated>false</IsTruncated>"

    # The policies are read from moto's store in this process (moto's server answers from the same store): a
    # simulation reads a dozen of them, which over HTTP took 60 ms of the 00 check's every call.

    def _backend(self):
        from moto.iam.models import iam_backends

        return iam_backends[self.account_id]["global"]

    def _caller(self, request: Request) -> str | None:
        """The ARN of the IAM user whose access key signed the request, or None for moto's default caller."""
        found = _CREDENTIAL.search(request.headers.get("Authorization", ""))
        if not found or len(found.group(1)) < 16:  # shorter than an access key id ("testing"): moto's default
            return None
        from moto.iam.exceptions import NotFoundException

        backend = self._backend()
        try:
            return backend.get_user(backend.get_access_key_last_used(found.group(1))["user_name"]).arn
        except NotFoundException:  # a key moto does not know: its default caller
            return None

    def _documents(self, principal: str) -> list[dict]:
        from moto.iam.exceptions import NoSuchEntity, NotFoundException

        kind, _, name = principal.split(":", 5)[-1].partition("/")
        name = name.rsplit("/", 1)[-1]
        backend = self._backend()
        try:
            if kind == "user":
                user = backend.get_user(name)
                texts = list(user.policies.values())
                attached = list(user.managed_policies.values())
                for group in backend.get_groups_for_user(name):
                    texts += list(group.policies.values())
                    attached += list(group.managed_policies.values())
            elif kind == "role":
                role = backend.get_role(name)
                texts, attached = list(role.policies.values()), list(role.managed_policies.values())
            else:
                raise _Error("InvalidInput", f"{principal} is not the ARN of an IAM user or role", 400)
        except (NoSuchEntity, NotFoundException):  # moto's two ways of answering NoSuchEntity
            raise _Error("NoSuchEntity", f"The {kind} with name {name} cannot be found.", 404) from None
        texts += [backend.get_policy_version(policy.arn, policy.default_version_id).document for policy in attached]
        return [_document(text) for text in texts]

    @staticmethod
    def _xml(operation: str, result: str) -> Response:
        return Response(f'<{operation}Response xmlns="{_NS}"><{operation}Result>{result}</{operation}Result>'
                        f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata>"
                        f"</{operation}Response>", content_type="text/xml")


def _document(text) -> dict:
    """A policy document as moto keeps it: JSON text (URL-encoded when it came so), or already a dict."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return json.loads(unquote(text))


def _members(form, name: str) -> list[str]:
    values, n = [], 1
    while f"{name}.member.{n}" in form:
        values.append(form[f"{name}.member.{n}"])
        n += 1
    return values


def make_app(moto_url: str, account_id: str = "123456789012") -> IamSimulator:
    """The WSGI app for moto's server at `moto_url`, which runs in this process (its IAM of `account_id`); serve it
    with tests.standins.serve and point AWS_ENDPOINT_URL_IAM at it."""
    return IamSimulator(moto_url, account_id)
