{{/* Release-scoped name, DNS-safe. */}}
{{- define "elasticmoe.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "elasticmoe.labels" -}}
app.kubernetes.io/name: elasticmoe
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "elasticmoe.operatorSelector" -}}
app.kubernetes.io/name: elasticmoe
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "elasticmoe.serviceAccountName" -}}
{{- default (printf "%s-operator" (include "elasticmoe.fullname" .)) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "elasticmoe.image" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) -}}
{{- end -}}

{{- define "elasticmoe.redisSecret" -}}
{{- default (printf "%s-redis" (include "elasticmoe.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- end -}}
