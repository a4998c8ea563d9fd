{{/* Generated from kubetune's operator/permissions.py by `python -m kubetune.operator.rbacgen charts/kubetune`. Do not edit. */}}
{{- define "kubetune.rules.namespaced" -}}
# kopf watches FineTuneJobs and enqueues them (handlers/finetunejob.py on_job_event)
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs"]
  verbs: ["list", "watch"]
# each pass reads its job, and a deployment the job it follows (reconcile/*.py)
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs"]
  verbs: ["get"]
# status is written as a merge patch of the status subresource (reconcile patch_status)
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
# kopf watches ModelDeployments and enqueues them (handlers/modeldeployment.py)
- apiGroups: ["kubetune.io"]
  resources: ["modeldeployments"]
  verbs: ["list", "watch"]
# each pass reads its deployment (reconcile/modeldeployment.py)
- apiGroups: ["kubetune.io"]
  resources: ["modeldeployments"]
  verbs: ["get"]
# status is written as a merge patch of the status subresource (reconcile patch_status)
- apiGroups: ["kubetune.io"]
  resources: ["modeldeployments/status"]
  verbs: ["patch"]
# the runs' cache: an informer selected by kubetune's labels (handlers/finetunejob.py RUNS)
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  verbs: ["list", "watch"]
# a run's RayJob is created, read when not cached yet or its name is taken, and deleted when the run
# is stopped or leaves the history (reconcile/finetunejob.py)
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  verbs: ["get", "create", "delete"]
# a GPU run's plan Job (CPU) is created before its RayJob, read while the run is planned, and
# deleted with the run (reconcile/finetunejob.py)
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "create", "delete"]
# the runs' reports: an informer selected by kubetune's labels (handlers/finetunejob.py REPORTS)
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["list", "watch"]
# a run's config and report ConfigMaps are created, checked when their name is taken, and deleted
# with the run (reconcile/finetunejob.py)
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "delete"]
# granted to each run's Role on its report, by name (builders/finetunejob.py): Kubernetes lets a
# Role grant only what its creator holds, so the operator holds this verb itself, though it never
# patches a ConfigMap. The one write on a core kind it does not use
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["patch"]
# each run's own ServiceAccount, the identity of the pod that reports (reconcile/finetunejob.py)
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "create", "delete"]
# each run's Role: write access to its own report only (reconcile/finetunejob.py)
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles"]
  verbs: ["get", "create", "delete"]
# binds each run's Role to its ServiceAccount (reconcile/finetunejob.py)
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["rolebindings"]
  verbs: ["get", "create", "delete"]
# why a run or an endpoint waits (unschedulable, image pull): informers of the runs' and the
# endpoints' pods selected by kubetune's labels (handlers/finetunejob.py,
# handlers/modeldeployment.py PODS)
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# the endpoints' cache: an informer selected by kubetune's labels (handlers/modeldeployment.py)
- apiGroups: ["ray.io"]
  resources: ["rayservices"]
  verbs: ["list", "watch"]
# an endpoint's RayService is created, checked when its name is taken, and patched to roll out a new
# model (reconcile/modeldeployment.py)
- apiGroups: ["ray.io"]
  resources: ["rayservices"]
  verbs: ["get", "create", "patch"]
# closes each run's and each endpoint's Ray cluster to other pods; read on every pass while the
# cluster runs, made again if deleted and patched back if changed (reconcile apply_owned); deleted
# with a run the history forgets
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "patch", "delete"]
# every transition is recorded as an Event on its object (kube.py Kube.event)
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
{{- define "kubetune.rules.cluster" -}}
# kopf follows the CRDs of the kinds it serves (discovery itself needs no grant); KubeRay's are
# listed by name to see whether they have authOptions (kuberay.py)
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end }}
{{- define "kubetune.rules.operatorNamespace" -}}
# the replicas elect their leader on a Lease: each reads it, creates it when missing, and renews or
# takes it over by replacing it (leader.py, kubernetes' leader election)
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "create", "update"]
{{- end }}
