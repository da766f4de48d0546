{{/* The release's name for every object: RELEASE-rollbackd, or RELEASE if it says rollbackd. */}}
{{- define "rollbackd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "rollbackd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rollbackd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rollbackd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "rollbackd.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "rollbackd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "rollbackd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "rollbackd.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret mounted as files: the user's, or the chart's own when secrets.create has keys. */}}
{{- define "rollbackd.secretName" -}}
{{- if .Values.secrets.existingSecret -}}
{{- .Values.secrets.existingSecret -}}
{{- else if .Values.secrets.create -}}
{{- include "rollbackd.fullname" . -}}
{{- end -}}
{{- end -}}

{{- define "rollbackd.configMapName" -}}
{{- default (include "rollbackd.fullname" .) .Values.rules.existingConfigMap -}}
{{- end -}}

{{/*
RBAC rules per backend kind: only what rollbackd/actions/kubernetes.py calls (a read before
every change, then a patch; the Argo abort patches the status subresource).
*/}}
{{- define "rollbackd.rbacRules" -}}
{{- $names := .Values.rbac.resourceNames -}}
{{- range $kind := .Values.rbac.kinds }}
{{- if eq $kind "deployment" }}
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "patch"]
  {{- with $names }}
  resourceNames: {{ toJson . }}
  {{- end }}
{{- else if eq $kind "argo-rollout" }}
- apiGroups: ["argoproj.io"]
  resources: ["rollouts"]
  verbs: ["get", "patch"]
  {{- with $names }}
  resourceNames: {{ toJson . }}
  {{- end }}
- apiGroups: ["argoproj.io"]
  resources: ["rollouts/status"]
  verbs: ["patch"]
  {{- with $names }}
  resourceNames: {{ toJson . }}
  {{- end }}
{{- else if eq $kind "kserve" }}
- apiGroups: ["serving.kserve.io"]
  resources: ["inferenceservices"]
  verbs: ["get", "patch"]
  {{- with $names }}
  resourceNames: {{ toJson . }}
  {{- end }}
{{- else }}
{{- fail (printf "rbac.kinds: %q is not a kubernetes backend kind (deployment, argo-rollout, kserve)" $kind) }}
{{- end }}
{{- end }}
{{- end -}}
