{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "pagedserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "pagedserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pagedserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pagedserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pagedserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pagedserve.labels" -}}
helm.sh/chart: {{ include "pagedserve.chart" . }}
{{ include "pagedserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: inference-server
{{- end }}

{{- define "pagedserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pagedserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pagedserve.image" -}}
{{- $flavor := ternary "cuda" "cpu" .Values.gpu.enabled }}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion $flavor) .Values.image.tag }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* The name clients send as "model" and the model_name label of every metric. */}}
{{- define "pagedserve.servedModelName" -}}
{{- .Values.servedModelName | default .Values.model | default "pagedserve-demo" }}
{{- end }}

{{/*
Label matchers selecting this release's series: model_name plus metricsSelector (templated),
e.g. model_name="pagedserve-demo",namespace="default",job="r-pagedserve". Keys are sorted.
*/}}
{{- define "pagedserve.metricMatchers" -}}
{{- $m := list (printf "model_name=%s" (include "pagedserve.servedModelName" . | quote)) }}
{{- range $k, $v := .Values.metricsSelector }}
{{- if and $v (ne $k "model_name") }}
{{- $m = append $m (printf "%s=%s" $k (tpl (toString $v) $ | quote)) }}
{{- end }}
{{- end }}
{{- join "," $m }}
{{- end }}

{{/* metricsSelector alone (targets' labels, e.g. for `up`); the job alone when it is empty. */}}
{{- define "pagedserve.targetMatchers" -}}
{{- $m := list }}
{{- range $k, $v := .Values.metricsSelector }}
{{- if and $v (ne $k "model_name") }}
{{- $m = append $m (printf "%s=%s" $k (tpl (toString $v) $ | quote)) }}
{{- end }}
{{- end }}
{{- if not $m }}
{{- $m = list (printf "job=%s" (include "pagedserve.fullname" . | quote)) }}
{{- end }}
{{- join "," $m }}
{{- end }}

{{/* The KEDA trigger's query: this model's waiting queue, summed over its replicas. */}}
{{- define "pagedserve.kedaQuery" -}}
{{- if .Values.keda.query }}
{{- tpl .Values.keda.query . }}
{{- else }}
{{- printf "sum(pagedserve:num_requests_waiting{%s})" (include "pagedserve.metricMatchers" .) }}
{{- end }}
{{- end }}

{{- define "pagedserve.terminationGracePeriodSeconds" -}}
{{- add (int .Values.server.preStopSleepSeconds) (int .Values.server.shutdownTimeout) (int .Values.server.terminationGraceMarginSeconds) }}
{{- end }}

{{- define "pagedserve.hfTokenSecretName" -}}
{{- if .Values.hfToken.existingSecret }}{{ .Values.hfToken.existingSecret }}{{ else }}{{ include "pagedserve.fullname" . }}-secrets{{ end }}
{{- end }}

{{- define "pagedserve.apiKeySecretName" -}}
{{- if .Values.apiKey.existingSecret }}{{ .Values.apiKey.existingSecret }}{{ else }}{{ include "pagedserve.fullname" . }}-secrets{{ end }}
{{- end }}

{{- define "pagedserve.pvcName" -}}
{{- default (printf "%s-hf-cache" (include "pagedserve.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/* Checks across values that the JSON schema cannot express with a clear message. */}}
{{- define "pagedserve.validate" -}}
{{- if and .Values.keda.enabled .Values.autoscaling.enabled }}
{{- fail "keda.enabled and autoscaling.enabled are mutually exclusive: both would create a HorizontalPodAutoscaler for the same Deployment. Enable one of them." }}
{{- end }}
{{- if and .Values.keda.enabled (gt (int .Values.keda.minReplicaCount) (int .Values.keda.maxReplicaCount)) }}
{{- fail "keda.minReplicaCount must not exceed keda.maxReplicaCount." }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas." }}
{{- end }}
{{- end }}
