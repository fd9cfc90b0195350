"""Jobs sized to Bedrock's quotas: planning a run's jobs over a folder tree in as few waves as possible, and
submitting them as slots free up.

Bedrock reads *every* `.jsonl` under a job's input folder, and a record's image must sit under that folder. So
two jobs whose input folders nest (one is the other or inside it) must never have manifests in S3 at the same
time, and at most MAX_CONCURRENT_JOBS run at once. Each job pays Bedrock's validation and scheduling wait, so
the plan is measured in *waves* (see `waves`): the planner looks for the fewest waves, then the fewest jobs.

A folder whose whole subtree fits one job is a job of its own, or is taken whole by a job of an ancestor. A
folder with more is split: k jobs rooted at it take its own images, the sub-folders too small for a job and as
many whole sub-folders as fit (smallest first), and its other sub-folders are planned the same way below it with
k fewer waves to spend. Jobs rooted at a folder run alone within that folder, so k is chosen, folder by folder,
for the fewest jobs within the run's wave budget, and the budget is the smallest that works. A remainder below
MIN_RECORDS_PER_JOB that would need a job of its own at the top (a wave of its own) goes on demand instead
(InvokeModel, up to ON_DEMAND_MAX_IMAGES images), or borrows images from a sibling job. A job's manifest is
uploaded only when the job is submitted and removed when it ends.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Callable

import common
from batch_embeddings import jobinfo, naming

# An allocation: the direct images of `folder` with listing index start <= i < end.
Allocation = tuple[str, int, int]


@dataclass
class Folder:
    images: int = 0  # directly in this folder
    bytes: int = 0  # their manifest lines
    children: set[str] = field(default_factory=set)


@dataclass
class PlannedJob:
    root: str  # the job's input folder (a prefix ending in "/", or "" for the bucket)
    allocations: list[Allocation]

    @property
    def records(self) -> int:
        return count(self.allocations)


@dataclass
class Plan:
    """The run's batch jobs, in the order they are submitted, and the images embedded on demand by step 3."""

    jobs: list[PlannedJob]
    on_demand: list[Allocation] = field(default_factory=list)
    max_concurrent: int = 10

    @property
    def on_demand_records(self) -> int:
        return count(self.on_demand)

    def waves(self) -> list[list[int]]:
        return waves([job.root for job in self.jobs], self.max_concurrent)


def count(allocations: list[Allocation]) -> int:
    return sum(end - start for _, start, end in allocations)


def parent_folder(folder: str) -> str:
    return folder[: folder.rstrip("/").rfind("/") + 1] if folder else ""


def folder_of(key: str) -> str:
    return key[: key.rfind("/") + 1]


def nested(a: str, b: str) -> bool:
    """Whether two input folders overlap: one of them would read the other's manifests."""
    return a.startswith(b) or b.startswith(a)


def _self_and_ancestors(folder: str) -> list[str]:
    parts = folder.split("/")[:-1]
    return [""] + ["/".join(parts[:i]) + "/" for i in range(1, len(parts) + 1)]


def waves(roots: list[str], max_concurrent: int) -> list[list[int]]:
    """The waves of a plan: its jobs (given by input folder, in submit order) run the way `submit_ready` starts
    them, as if every job took the same time. A wave takes each job in order that nests with no job already in
    it, up to `max_concurrent`; the others wait for the next wave. Returns the job indexes of each wave."""
    left = list(range(len(roots)))
    out = []
    while left:
        wave, inside, above, waiting = [], set(), set(), []
        for i in left:
            root = roots[i]
            chain = _self_and_ancestors(root)
            if len(wave) >= max_concurrent or root in above or any(f in inside for f in chain):
                waiting.append(i)
                continue
            wave.append(i)
            inside.add(root)
            above.update(chain)
        out.append(wave)
        left = waiting
    return out


def waits_for(roots: list[str], planned_waves: list[list[int]]) -> dict[int, list[int]]:
    """For each job after the first wave, the jobs of earlier waves whose folders nest with its own (none: it
    waits for a free slot)."""
    out, before = {}, list(planned_waves[0]) if planned_waves else []
    for members in planned_waves[1:]:
        for i in members:
            out[i] = [j for j in before if nested(roots[i], roots[j])]
        before += members
    return out


def folder_tree(counts: dict[str, tuple[int, int]], root: str) -> dict[str, Folder]:
    """Folders under `root` with their direct image counts, every intermediate folder included."""
    tree = {root: Folder()}
    for folder, (images, size) in counts.items():
        node = tree.setdefault(folder, Folder())
        node.images, node.bytes = images, size
        while folder != root:
            parent = parent_folder(folder)
            tree.setdefault(parent, Folder()).children.add(folder)
            folder = parent
    return tree


@dataclass
class _Option:
    """One way to plan a folder's subtree within a wave budget."""

    jobs: int  # jobs rooted in the subtree
    left: int  # images passed up to a job of an ancestor
    waves: int  # waves the subtree's jobs need, at least (jobs rooted at a folder run alone within it)
    build: Callable[[], tuple[list[PlannedJob], list[Allocation]]]


class _Planner:
    def __init__(self, tree: dict[str, Folder], quotas: common.Quotas, can_root):
        self.tree, self.quotas, self.can_root = tree, quotas, can_root
        self.totals: dict[str, int] = {}
        for folder in sorted(tree, key=lambda f: -f.count("/")):  # children before parents
            node = tree[folder]
            self.totals[folder] = node.images + sum(self.totals[c] for c in node.children)
        line = max((n.bytes / n.images for n in tree.values() if n.images), default=1.0)
        # Records per job: the records quota, or fewer when the bytes quota binds first (with a margin).
        self.cap = max(1, min(quotas.max_records_per_job, int(quotas.max_job_bytes / (line * 1.05))))
        self.kinds_memo: dict[str, tuple] = {}
        self.memo: dict[tuple[str, int], tuple[_Option | None, _Option | None]] = {}

    def subtree(self, folder: str) -> list[Allocation]:
        node = self.tree[folder]
        own = [(folder, 0, node.images)] if node.images else []
        return own + [a for child in sorted(node.children) for a in self.subtree(child)]

    def fits(self, folder: str) -> bool:
        return self.can_root(folder) and self.quotas.min_records_per_job <= self.totals[folder] <= self.cap

    def kinds(self, folder: str):
        """The folder's sub-folders: too small for a job, one job each (smallest first), and larger."""
        if folder not in self.kinds_memo:
            children = sorted(self.tree[folder].children)
            small = [c for c in children if self.totals[c] < self.quotas.min_records_per_job]
            fitting = sorted((c for c in children if self.totals[c] >= self.quotas.min_records_per_job
                              and self.fits(c)), key=lambda c: (self.totals[c], c))
            taken = set(small) | set(fitting)
            larger = [c for c in children if c not in taken]
            prefix = [0]
            for c in fitting:
                prefix.append(prefix[-1] + self.totals[c])
            self.kinds_memo[folder] = (small, fitting, prefix, larger)
        return self.kinds_memo[folder]

    def best(self, folder: str, budget: int) -> tuple[_Option | None, _Option | None]:
        """(fewest jobs with nothing passed up, fewest jobs passing images up) for the subtree in `budget` waves."""
        key = (folder, budget)
        if key not in self.memo:
            self.memo[key] = self._best(folder, budget)
        return self.memo[key]

    def _best(self, folder: str, budget: int):
        """The best plans of `folder`'s subtree within `budget` waves: (closed, opened). A closed plan places every
        image; an opened one leaves images (`left`) for the jobs of an ancestor to take.

        For each k, the number of jobs rooted at this folder (0 up to what its images need and the budget allows):
        the larger sub-folders are planned below with the budget left (or taken whole when none is left), open
        sub-plans pass their images up while this folder's jobs have room, the smallest sub-folders that fit are
        taken whole, and a remainder too small for a job borrows from a sibling. Fewest jobs win, then fewest
        waves."""
        q, cap, concurrent = self.quotas, self.cap, self.quotas.max_concurrent_jobs
        small, fitting, prefix, larger = self.kinds(folder)
        direct = self.tree[folder].images
        forced = direct + sum(self.totals[c] for c in small)
        closed = opened = None
        k_max = min(budget, math.ceil(self.totals[folder] / cap)) if self.can_root(folder) else 0
        for k in range(k_max + 1):
            below = budget - k
            if below == 0 and k == 0:
                continue
            chosen, whole, switch = self._plan_larger(larger, below, k)
            if k == 0 and whole:
                continue
            must = forced + sum(o.left for o in chosen) + sum(self.totals[c] for c in whole)
            must = self._pass_up(chosen, switch, must, k * cap)
            sub_jobs = sum(o.jobs for o in chosen)
            sub_waves = max((o.waves for o in chosen), default=0)
            if k == 0:
                kept = len(fitting)
                jobs = sub_jobs + kept
                waves_needed = max(sub_waves, 1 if kept else 0, math.ceil(jobs / concurrent))
                if waves_needed > budget:
                    continue
                option = _Option(jobs, must, waves_needed, self._builder(folder, 0, chosen, whole, 0, 0))
                if must:
                    opened = option
                elif closed is None or (jobs, waves_needed) < (closed.jobs, closed.waves):
                    closed = option
                continue
            room = k * cap - must
            if room < 0:
                continue
            taken = bisect.bisect_right(prefix, room) - 1  # the smallest sub-folders that fit, whole
            if below == 0 and taken < len(fitting):
                continue
            records = must + prefix[taken]
            kept = len(fitting) - taken
            lend = 0
            if 0 < records < q.min_records_per_job:
                # Too few for a job: borrow the rest from the largest sub-folder job that keeps its minimum.
                lend = q.min_records_per_job - records
                donors = [c for c in fitting[taken:] if self.totals[c] - lend >= q.min_records_per_job]
                if not donors:
                    continue
                records += lend
            if records == 0:
                continue
            own = math.ceil(records / cap)
            jobs_below = sub_jobs + kept
            waves_needed = own + max(sub_waves, 1 if kept else 0, math.ceil(jobs_below / concurrent))
            if waves_needed > budget:
                continue
            jobs = own + jobs_below
            if closed is None or (jobs, waves_needed) < (closed.jobs, closed.waves):
                closed = _Option(jobs, 0, waves_needed, self._builder(folder, own, chosen, whole, taken, lend))
        return closed, opened

    def _plan_larger(self, larger: list[str], below: int, k: int):
        """The larger sub-folders: each planned below with `below` waves (`chosen`), or taken whole by this
        folder's jobs when no plan fits or no wave is left (`whole`). With k jobs here, a sub-folder takes its
        closed plan, and one whose open plan needs fewer jobs is listed in `switch` to pass images up instead."""
        chosen, whole, switch = [], [], []
        for c in larger:
            if below == 0:
                whole.append(c)
                continue
            c_closed, c_open = self.best(c, below)
            if k == 0:
                options = [o for o in (c_closed, c_open) if o is not None]
                pick = min(options, key=lambda o: (o.jobs + o.left / self.cap, o.left)) if options else None
            else:
                pick = c_closed or c_open
                if c_closed is not None and c_open is not None and c_open.jobs < c_closed.jobs:
                    switch.append((len(chosen), c_open))
            if pick is None:
                whole.append(c)
            else:
                chosen.append(pick)
        return chosen, whole, switch

    @staticmethod
    def _pass_up(chosen: list, switch: list, must: int, room: int) -> int:
        """Sub-folders that save jobs by passing images up to this folder's jobs, while they have `room`, most
        jobs saved per image first; returns the images this folder's jobs must take."""
        for i, c_open in sorted(switch, key=lambda s: -(chosen[s[0]].jobs - s[1].jobs) / s[1].left):
            if must + c_open.left <= room:
                must += c_open.left
                chosen[i] = c_open
        return must

    def _builder(self, folder, own, chosen, whole, taken, lend):
        def build() -> tuple[list[PlannedJob], list[Allocation]]:
            small, fitting, _, _ = self.kinds(folder)
            planned: list[PlannedJob] = []
            pool = [(folder, 0, self.tree[folder].images)] if self.tree[folder].images else []
            pool += [a for c in small for a in self.subtree(c)]
            for option in chosen:
                jobs, left = option.build()
                planned += jobs
                pool += left
            pool += [a for c in whole for a in self.subtree(c)]
            pool += [a for c in fitting[:taken] for a in self.subtree(c)]
            kept = fitting[taken:]
            donor = max(kept, key=lambda c: self.totals[c]) if lend else None
            for c in kept:
                if c == donor:
                    keep, lent = _take_last(self.subtree(c), lend)
                    planned.append(PlannedJob(c, keep))
                    pool += lent
                else:
                    planned.append(PlannedJob(c, self.subtree(c)))
            if own == 0:
                return planned, pool
            return planned + [PlannedJob(folder, chunk) for chunk in split(pool, own)], []
        return build


def plan_jobs(counts: dict[str, tuple[int, int]], root: str, quotas: common.Quotas, can_root,
              on_demand_max: int = 0) -> Plan:
    """Partition the images under `root` into jobs within the quotas, in the fewest waves, then the fewest jobs.

    `counts` maps each folder to (images directly in it, bytes of their manifest lines); `can_root(folder)` says
    whether Bedrock accepts the folder as an input s3Uri. Every image lands in exactly one job, or among the at
    most `on_demand_max` images embedded on demand (a remainder below the minimum that would otherwise need a
    wave of its own, or a whole run below the minimum). A run below the minimum and above `on_demand_max` is one
    job too small: the caller refuses it.
    """
    planner = _Planner(folder_tree(counts, root), quotas, can_root)
    total = planner.totals[root]
    concurrent = quotas.max_concurrent_jobs
    if total == 0:
        return Plan([], [], concurrent)
    if total < quotas.min_records_per_job:
        if total <= on_demand_max:
            return Plan([], planner.subtree(root), concurrent)
        return Plan([PlannedJob(root, planner.subtree(root))], [], concurrent)
    lowest = max(1, math.ceil(math.ceil(total / planner.cap) / concurrent))
    highest = lowest + len(planner.tree) + math.ceil(total / planner.cap) + 1
    candidates: list[Plan] = []
    first = None
    for budget in range(lowest, highest + 1):
        closed, opened = planner.best(root, budget)
        if closed is not None:
            candidates.append(_finish(closed.build()[0], [], concurrent))
        if opened is not None and opened.left < quotas.min_records_per_job and opened.left <= on_demand_max:
            jobs, left = opened.build()
            candidates.append(_finish(jobs, left, concurrent))
        if candidates and first is None:
            first = budget
        if first is not None and budget >= first + 2:
            break  # a budget or two past the first that works: the wave estimate is a bound, not the count
    if not candidates:  # e.g. images directly in a run folder Bedrock cannot take as input: the old way
        jobs, left = planner.best(root, highest)[1].build()
        return Plan(absorb(jobs, left, root, quotas), [], concurrent)
    return min(candidates, key=lambda p: (len(p.waves()), p.on_demand_records, len(p.jobs)))


def _finish(planned: list[PlannedJob], on_demand: list[Allocation], concurrent: int) -> Plan:
    """The jobs in the submit order that needs fewer waves: as built (sub-folders first), or top folders first."""
    built = Plan(planned, on_demand, concurrent)
    shallow = Plan(sorted(planned, key=lambda j: j.root.count("/")), on_demand, concurrent)
    return shallow if len(shallow.waves()) < len(built.waves()) else built


def split(allocations: list[Allocation], parts: int) -> list[list[Allocation]]:
    """Cut allocations into `parts` runs of nearly equal size, in order."""
    n = count(allocations)
    sizes = [n // parts + (1 if i < n % parts else 0) for i in range(parts)]
    chunks, current, need = [], [], sizes[0]
    queue = list(reversed(allocations))
    while queue:
        folder, start, end = queue.pop()
        take = min(end - start, need)
        current.append((folder, start, start + take))
        need -= take
        if start + take < end:
            queue.append((folder, start + take, end))
        if need == 0:
            chunks.append(current)
            current = []
            if len(chunks) < parts:
                need = sizes[len(chunks)]
    return chunks


def absorb(jobs: list[PlannedJob], leftover: list[Allocation], root: str, quotas: common.Quotas) -> list[PlannedJob]:
    """Give images too few for a job of their own to a job rooted at `root`; nothing is dropped."""
    left = count(leftover)
    if not left:
        return jobs
    if not jobs:
        return [PlannedJob(root, leftover)]  # fewer than the minimum in all: the caller reports it
    roomy = [j for j in jobs if j.records + left <= quotas.max_records_per_job]
    if roomy:
        target = min(roomy, key=lambda j: j.records)
        target.root = root  # moved up to the run's folder, which holds both
        target.allocations += leftover
        return jobs
    # Every job is full: lend the leftover enough images from the largest job to make a job of its own.
    donor = max(jobs, key=lambda j: j.records)
    want = max(quotas.min_records_per_job - left, 0)
    keep, lent = _take_last(donor.allocations, want)
    donor.allocations = keep
    return jobs + [PlannedJob(root, leftover + lent)]


def _take_last(allocations: list[Allocation], n: int) -> tuple[list[Allocation], list[Allocation]]:
    keep, lent = list(allocations), []
    while n:
        folder, start, end = keep.pop()
        take = min(n, end - start)
        lent.insert(0, (folder, end - take, end))
        if end - take > start:
            keep.append((folder, start, end - take))
        n -= take
    return keep, lent


# --------------------------------------------------------------------------------------------------------------
# Submitting
# --------------------------------------------------------------------------------------------------------------


LIST_PAGE_SIZE = 1000  # ListModelInvocationJobs' largest page


def active(job: dict) -> bool:
    """Submitted (or being submitted) and not ended: its manifests are in S3."""
    return bool(job.get("uploaded")) and job.get("status") not in jobinfo.TERMINAL_STATUSES


def queued(job: dict) -> bool:
    return not job.get("job_arn") and not job.get("on_demand")  # an on-demand part is no job: step 3 embeds it


@dataclass
class RunState:
    """The jobs of a run that keep it from being finished, by reason."""

    queued: list[dict] = field(default_factory=list)
    running: list[dict] = field(default_factory=list)
    unloaded: list[dict] = field(default_factory=list)  # ended with results that step 3 has not loaded


def needs_status(job: dict) -> bool:
    """Whether Bedrock must be asked for the job's status: it was submitted and had not ended when last asked (an
    ended job's status never changes)."""
    return bool(job.get("job_arn")) and job.get("status") not in jobinfo.TERMINAL_STATUSES


def refresh(bedrock, info: dict) -> RunState:
    """Ask Bedrock for the status of every submitted job that had not ended (kept in its record) and sort out what
    is unfinished. `bedrock` may be None when no job needs asking (`needs_status`)."""
    state = RunState()
    for job in info["jobs"]:
        if job.get("on_demand"):  # no Bedrock job: waits only for step 3 to embed and load it
            if not jobinfo.job_loaded(job):
                state.unloaded.append(job)
            continue
        if queued(job):
            state.queued.append(job)
            continue
        if needs_status(job):
            job["status"] = bedrock.get_model_invocation_job(jobIdentifier=job["job_arn"])["status"]
        if job["status"] not in jobinfo.TERMINAL_STATUSES:
            state.running.append(job)
        elif job["status"] in jobinfo.LOADABLE_STATUSES and not jobinfo.job_loaded(job):
            state.unloaded.append(job)
    return state


def submit_ready(s3, bedrock, info: dict, config: common.Config, save, max_concurrent: int) -> list[dict]:
    """Submit the queued jobs that may start now; returns those submitted.

    A job waits while MAX_CONCURRENT_JOBS jobs run or while a job whose folder nests with its own runs.
    ServiceQuotaExceeded and throttling leave it queued for the next call (02 --wait calls again).
    """
    from botocore.exceptions import ClientError

    owner = common.bucket_owner(config, info["account_id"])
    submitted = []
    for job in info["jobs"]:
        if not queued(job):
            continue
        running = [j for j in info["jobs"] if j is not job and active(j)]
        if not job.get("uploaded"):
            if len(running) >= max_concurrent or any(nested(job["input_folder"], j["input_folder"]) for j in running):
                continue
            upload_manifests(s3, info["source_bucket"], job, owner)
            job["uploaded"] = True
            save(info)  # before the submit: a submit whose answer is lost is looked for by name next time
        elif found := submitted_job(bedrock, job):
            # Uploaded by an earlier call whose submit may have reached Bedrock: how long Bedrock remembers the
            # token is not documented, so the job is looked for before it is submitted again.
            print(f"Job {job['job_name']} was already submitted (the answer was lost): {found}")
            job["job_arn"] = found
        try:
            if not job.get("job_arn"):
                take_current_role(job, config)
                job["job_arn"] = create_job(bedrock, owner, job)
        except ClientError as exc:
            found = earlier_submit(bedrock, job, exc)
            if found:
                print(f"Job {job['job_name']} was already submitted (the answer was lost): {found}")
                job["job_arn"] = found
            elif role_refused(exc, job["role_arn"]):
                # Nothing stays uploaded; the job stays queued and takes the ROLE_ARN of the next run.
                remove_manifests(s3, info["source_bucket"], job, owner)
                job["uploaded"] = False
                save(info)
                raise common.StepError(
                    f"Bedrock refused the service role: {common.describe_aws_error(exc)} — fix ROLE_ARN (or the "
                    "caller's iam:PassRole on it: bash iam/setup_service_role.sh --user-policy) and run "
                    "01_create_job.py again: the job is submitted with the ROLE_ARN set then; its manifest was "
                    "removed from S3", common.EXIT_USAGE) from None
            elif common.error_code(exc) in ("ValidationException", "AccessDeniedException"):
                raise common.StepError(f"{common.describe_aws_error(exc)} — fix the cause, then "
                                       "01_create_job.py --force plans the run again") from None
            elif common.error_code(exc) not in ("ServiceQuotaExceededException", "ThrottlingException"):
                raise
            else:
                print(f"Job {job['job_name']} stays queued: {common.describe_aws_error(exc)}")
                break
        job["job_id"] = naming.job_id_from_arn(job["job_arn"])
        job["status"] = "Submitted"
        save(info)
        submitted.append(job)
    return submitted


def take_current_role(job: dict, config: common.Config) -> None:
    """A job not yet submitted is submitted with the ROLE_ARN set now (a fixed setting reaches a queued job)."""
    if config.role_arn and job.get("role_arn") != config.role_arn:
        print(f"Job {job['job_name']} is submitted with ROLE_ARN {config.role_arn} "
              f"(planned with {job.get('role_arn')})")
        job["role_arn"] = config.role_arn


def role_refused(exc, role_arn: str) -> bool:
    """Whether Bedrock refused a submit for its service role: ValidationException or AccessDeniedException naming
    the role or iam:PassRole."""
    if common.error_code(exc) not in ("ValidationException", "AccessDeniedException"):
        return False
    message = exc.response.get("Error", {}).get("Message", "")
    return role_arn in message or f"role/{role_arn.rsplit('/', 1)[-1]}" in message or "passrole" in message.lower()


def remove_manifests(s3, bucket: str, job: dict, owner: str) -> None:
    """Delete the job's manifests from S3 (its local copies stay: the job is submitted from them later)."""
    for manifest in job["manifests"]:
        if common.object_exists(s3, bucket, manifest["s3_key"], owner):
            common.delete_object(s3, bucket, manifest["s3_key"], owner)
            print(f"Removed {common.s3_uri(bucket, manifest['s3_key'])}: the job was not submitted")


def upload_manifests(s3, bucket: str, job: dict, owner: str) -> None:
    for manifest in job["manifests"]:
        if common.object_exists(s3, bucket, manifest["s3_key"], owner):
            continue
        local = manifest["local_path"]
        uri = common.s3_uri(bucket, manifest["s3_key"])
        print(f"Uploading JSONL to {uri}")
        try:
            s3.upload_file(local, bucket, manifest["s3_key"],
                           ExtraArgs={"ExpectedBucketOwner": owner, "ContentType": "application/jsonl"})
        except FileNotFoundError:
            raise common.StepError(f"manifest {local} is gone — run 04_remove_completed_task.py --force and "
                                   "01_create_job.py again") from None
        common.ok(f"Uploaded to {uri}")


def earlier_submit(bedrock, job: dict, exc) -> str | None:
    """The ARN of the job an earlier submit of `job` created, when Bedrock refused the repeat with an error.

    The API reference says a repeated clientRequestToken is ignored without an error; whether the earlier job's ARN
    comes back is unverified. If Bedrock answers ConflictException, or ValidationException naming the token or the
    job name, the job is looked up by name (`submitted_job`).
    """
    code, message = common.error_code(exc), exc.response.get("Error", {}).get("Message", "")
    if not (code == "ConflictException" or (code == "ValidationException" and (
            job["client_request_token"] in message or job["job_name"] in message))):
        return None
    return submitted_job(bedrock, job)


def submitted_job(bedrock, job: dict) -> str | None:
    """The ARN of the job an earlier submit of `job` created, or None: looked up by name in every page of
    ListModelInvocationJobs (nameContains matches parts of names too: the name must be equal) and taken when it is
    ours: the same token when Bedrock shows it, else the same input and output folders."""
    pages = bedrock.get_paginator("list_model_invocation_jobs").paginate(
        nameContains=job["job_name"], PaginationConfig={"PageSize": LIST_PAGE_SIZE})
    for page in pages:
        for summary in page.get("invocationJobSummaries", []):
            if summary.get("jobName") == job["job_name"] and _same_submit(summary, job):
                return summary["jobArn"]
    return None


def _same_submit(summary: dict, job: dict) -> bool:
    token = summary.get("clientRequestToken")
    if token is not None:
        return token == job["client_request_token"]
    input_uri = summary.get("inputDataConfig", {}).get("s3InputDataConfig", {}).get("s3Uri")
    output_uri = summary.get("outputDataConfig", {}).get("s3OutputDataConfig", {}).get("s3Uri")
    return input_uri == job["input_s3_uri"] and output_uri == job["output_s3_uri"]


def create_job(bedrock, owner: str, job: dict) -> str:
    """Submit one job as 01 planned it; its clientRequestToken makes a repeated submit return the same job."""
    output = {"s3Uri": job["output_s3_uri"], "s3BucketOwner": owner}
    if job.get("output_kms_key_id"):
        output["s3EncryptionKeyId"] = job["output_kms_key_id"]
    print(f"Creating batch inference job: {job['job_name']} ({job['record_count']} records, "
          f"input {job['input_s3_uri']})")
    response = bedrock.create_model_invocation_job(
        jobName=job["job_name"],
        roleArn=job["role_arn"],
        clientRequestToken=job["client_request_token"],
        modelId=job["model_id"],
        inputDataConfig={"s3InputDataConfig": {"s3Uri": job["input_s3_uri"], "s3InputFormat": "JSONL",
                                               "s3BucketOwner": owner}},
        outputDataConfig={"s3OutputDataConfig": output},
    )
    return response["jobArn"]
