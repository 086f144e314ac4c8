{{- define "podlease.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "podlease.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "podlease.selectorLabels" -}}
app.kubernetes.io/name: {{ include "podlease.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "podlease.labels" -}}
{{ include "podlease.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "podlease.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "podlease.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* What the controller does with pods, ServiceRegistrations and Events: exactly the
     calls it makes (list+watch, merge patches, event create/patch). */}}
{{- define "podlease.workloadRules" -}}
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# The readiness gate podlease.io/registered: one condition of gated pods.
- apiGroups: [""]
  resources: [pods/status]
  verbs: [patch]
- apiGroups: [podlease.io]
  resources: [serviceregistrations]
  verbs: [list, watch, patch]
- apiGroups: [podlease.io]
  resources: [serviceregistrations/status]
  verbs: [patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}

{{/*
The cluster id the replicas are given: clusterId, else the UID of namespace kube-system
looked up at install and upgrade (the value podlease would read itself, so an existing
install keeps its identity). Given on the command line, a replica that starts while the API
server is down still knows it and keeps the recorded leases alive. Empty where Helm cannot
look it up (helm template, --dry-run): podlease then reads it at start.
*/}}
{{- define "podlease.clusterId" -}}
{{- $fromEnv := false -}}
{{- range .Values.extraEnv -}}
{{- if eq .name "PODLEASE_CLUSTER_ID" -}}{{- $fromEnv = true -}}{{- end -}}
{{- end -}}
{{- if .Values.clusterId -}}
{{- .Values.clusterId -}}
{{- else if $fromEnv -}}
{{- /* Set through extraEnv (the flag would override it): podlease reads it from there. */ -}}
{{- else -}}
{{- with lookup "v1" "Namespace" "" "kube-system" -}}
{{- .metadata.uid -}}
{{- end -}}
{{- end -}}
{{- end -}}
