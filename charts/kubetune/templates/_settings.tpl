{{/* Generated from kubetune's operator/settings.py by `python -m kubetune.operator.settingsgen docs charts/kubetune`. Do not edit. */}}
{{/* The operator's env from .Values.operator (the context): a setting left unset or empty keeps its default. */}}
{{- define "kubetune.settingsEnv" -}}
{{- $settings := . }}
{{- $value := dig "runtimeImage" nil $settings }}
{{- if or (kindIs "bool" $value) (kindIs "float64" $value) (kindIs "int64" $value) $value }}
- name: KUBETUNE_RUNTIME_IMAGE
  value: {{ if kindIs "slice" $value }}{{ join "," $value | quote }}{{ else if kindIs "map" $value }}{{ include "kubetune.labelList" $value | quote }}{{ else }}{{ $value | quote }}{{ end }}
{{- end }}
{{- $value := dig "imagePullSecrets" nil $settings }}
{{- if or (kindIs "bool" $value) (kindIs "float64" $value) (kindIs "int64" $value) $value }}
- name: KUBETUNE_IMAGE_PULL_SECRETS
  value: {{ if kindIs "slice" $value }}{{ join "," $value | quote }}{{ else if kindIs "map" $value }}{{ include "kubetune.labelList" $value | quote }}{{ else }}{{ $value | quote }}{{ end }}
{{- end }}
{{- $value := dig "finishedClusterTtlSeconds" nil $settings }}
{{- if or (kindIs "bool" $value) (kindIs "float64" $value) (kindIs "int64" $value) $value }}
- name: KUBETUNE_FINISHED_CLUSTER_TTL_SECONDS
  value: {{ $value | int64 | quote }}
{{- end }}
{{- $value := dig "defaultActiveDeadlineSeconds" nil $settings }}
{{- if or (kindIs "bool" $value) (kindIs "float64" $value) (kindIs "int64" $value) $value }}
- name: KUBETUNE_DEFAULT_ACTIVE_DEADLINE_SECONDS
  value: {{ $value | int64 | quote }}
{{- end }}
{{- $value := dig "kuberayAuthOptions" nil $settings }}
{{- if or (kindIs "bool" $value) (kindIs "float64" $value) (kindIs "int64" $value) $value }}
- name: KUBETUNE_KUBERAY_AUTH_OPTIONS
  value: {{ if kindIs "slice" $value }}{{ join "," $value | quote }}{{ else if kindIs "map" $value }}{{ include "kubetune.labelList" $value | quote }}{{ else }}{{ $value | quote }}{{ end }}
{{- end }}
{{- $value := dig "kuberayOperatorLabels" nil $settings }}
{{- if or (kindIs "bool" $value) (kindIs "float64" $value) (kindIs "int64" $value) $value }}
- name: KUBETUNE_KUBERAY_OPERATOR_LABELS
  value: {{ if kindIs "slice" $value }}{{ join "," $value | quote }}{{ else if kindIs "map" $value }}{{ include "kubetune.labelList" $value | quote }}{{ else }}{{ $value | quote }}{{ end }}
{{- end }}
{{- $value := dig "kuberayNamespace" nil $settings }}
{{- if or (kindIs "bool" $value) (kindIs "float64" $value) (kindIs "int64" $value) $value }}
- name: KUBETUNE_KUBERAY_NAMESPACE
  value: {{ if kindIs "slice" $value }}{{ join "," $value | quote }}{{ else if kindIs "map" $value }}{{ include "kubetune.labelList" $value | quote }}{{ else }}{{ $value | quote }}{{ end }}
{{- end }}
{{- $value := dig "rayMetricsScraper" "namespace" nil $settings }}
{{- if or (kindIs "bool" $value) (kindIs "float64" $value) (kindIs "int64" $value) $value }}
- name: KUBETUNE_RAY_METRICS_NAMESPACE
  value: {{ if kindIs "slice" $value }}{{ join "," $value | quote }}{{ else if kindIs "map" $value }}{{ include "kubetune.labelList" $value | quote }}{{ else }}{{ $value | quote }}{{ end }}
{{- end }}
{{- $value := dig "rayMetricsScraper" "podLabels" nil $settings }}
{{- if or (kindIs "bool" $value) (kindIs "float64" $value) (kindIs "int64" $value) $value }}
- name: KUBETUNE_RAY_METRICS_POD_LABELS
  value: {{ if kindIs "slice" $value }}{{ join "," $value | quote }}{{ else if kindIs "map" $value }}{{ include "kubetune.labelList" $value | quote }}{{ else }}{{ $value | quote }}{{ end }}
{{- end }}
{{- $value := dig "workers" nil $settings }}
{{- if or (kindIs "bool" $value) (kindIs "float64" $value) (kindIs "int64" $value) $value }}
- name: KUBETUNE_WORKERS
  value: {{ $value | int64 | quote }}
{{- end }}
{{- $value := dig "allowedImages" nil $settings }}
{{- if or (kindIs "bool" $value) (kindIs "float64" $value) (kindIs "int64" $value) $value }}
- name: KUBETUNE_ALLOWED_IMAGES
  value: {{ if kindIs "slice" $value }}{{ join "," $value | quote }}{{ else if kindIs "map" $value }}{{ include "kubetune.labelList" $value | quote }}{{ else }}{{ $value | quote }}{{ end }}
{{- end }}
{{- $value := dig "allowedPriorityClasses" nil $settings }}
{{- if or (kindIs "bool" $value) (kindIs "float64" $value) (kindIs "int64" $value) $value }}
- name: KUBETUNE_ALLOWED_PRIORITY_CLASSES
  value: {{ if kindIs "slice" $value }}{{ join "," $value | quote }}{{ else if kindIs "map" $value }}{{ include "kubetune.labelList" $value | quote }}{{ else }}{{ $value | quote }}{{ end }}
{{- end }}
{{- $value := dig "allowedTolerations" nil $settings }}
{{- if or (kindIs "bool" $value) (kindIs "float64" $value) (kindIs "int64" $value) $value }}
- name: KUBETUNE_ALLOWED_TOLERATIONS
  value: {{ if kindIs "slice" $value }}{{ join "," $value | quote }}{{ else if kindIs "map" $value }}{{ include "kubetune.labelList" $value | quote }}{{ else }}{{ $value | quote }}{{ end }}
{{- end }}
{{- $value := dig "allowedNodeSelectors" nil $settings }}
{{- if or (kindIs "bool" $value) (kindIs "float64" $value) (kindIs "int64" $value) $value }}
- name: KUBETUNE_ALLOWED_NODE_SELECTORS
  value: {{ if kindIs "slice" $value }}{{ join "," $value | quote }}{{ else if kindIs "map" $value }}{{ include "kubetune.labelList" $value | quote }}{{ else }}{{ $value | quote }}{{ end }}
{{- end }}
{{- $value := dig "allowedRemoteCodeModels" nil $settings }}
{{- if or (kindIs "bool" $value) (kindIs "float64" $value) (kindIs "int64" $value) $value }}
- name: KUBETUNE_ALLOWED_REMOTE_CODE_MODELS
  value: {{ if kindIs "slice" $value }}{{ join "," $value | quote }}{{ else if kindIs "map" $value }}{{ include "kubetune.labelList" $value | quote }}{{ else }}{{ $value | quote }}{{ end }}
{{- end }}
{{- end }}
